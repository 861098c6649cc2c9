"""What the framework needs from a language model, and how a model backend plugs in.

The engine talks to one `TextGenerator`; where its text comes from is a
backend's business: the local transformers model (`chatforge.local`), a
model server speaking the OpenAI API, or a third party's. A backend is a
`GeneratorBackend` subclass registered through the
`chatforge_register_generators` hook and chosen by `generator.backend`;
its `Config` validates the `generator:` section, and `create` builds the
generator, importing what it needs (torch, an HTTP client) only then.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol, Sequence

from pydantic import BaseModel

from .memory import Turn

if TYPE_CHECKING:
    from .config import Settings

OnText = Callable[[str], None]
"""Receives each new piece of reply text as it is generated."""


@dataclass
class Usage:
    """The tokens one request cost, as the generator counted them: what the HTTP API reports as `usage`.

    A generator shared by many conversations cannot keep "the last request's" figures on itself (another
    reply may finish in between), so it adds them to the Usage of the task that asked (`count_usage`).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    counted: bool = False
    """Whether a generator reported anything (a command's answer costs no tokens, and reports none)."""


_current_usage: ContextVar[Usage | None] = ContextVar("chatforge_usage", default=None)


@contextlib.contextmanager
def measuring_usage() -> Iterator[Usage]:
    """Collect what generators report while the block runs in this task (and the tasks it starts)."""
    usage = Usage()
    token = _current_usage.set(usage)
    try:
        yield usage
    finally:
        _current_usage.reset(token)


def count_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """For generators: add one generation's tokens to the asking task's Usage, if it is measuring."""
    usage = _current_usage.get()
    if usage is not None:
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.counted = True


class TextGenerator(Protocol):
    """What the engine and plugins need from a generator (the test kit's fake has the same shape)."""

    name: str

    async def reply(self, history: Sequence[Turn], text: str, on_text: OnText | None = None) -> str:
        """Answer `text` as the next turn after `history`."""
        ...

    async def complete(self, instruction: str, max_new_tokens: int | None = None) -> str:
        """Answer a one-off instruction with no conversation history."""
        ...

    def close(self) -> Any:
        """Release the model or connections; may return an awaitable, which the engine awaits."""
        ...


class GeneratorBackend:
    """A kind of generator, chosen by `generator.backend: <name>`.

    Subclass it, set `name` and `Config` (a pydantic model of the whole `generator:` section, `backend`
    key included; unknown keys are errors), and build the generator in `create`. Keep heavy imports inside
    `create`: the module registering the backend is imported whichever backend is chosen.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    @classmethod
    def create(cls, config: Any, settings: "Settings") -> TextGenerator:
        """The generator for `config` (an instance of `Config`); may load a model or connect to a server."""
        raise NotImplementedError
