"""Every extension point of chatforge, in one place.

Plugins implement these with `@chatforge.hookimpl`. Registration hooks get a
`register` callback instead of returning lists (the simonw/llm style). Every
hook with a `config` argument receives the plugin's own validated config
section (its `chatforge_config_model`, or None). A plugin only needs to accept
the arguments it uses.

chatforge calls each implementation on its own: one that raises is logged
with the plugin's name and skipped (or is fatal under `--strict`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .message import Message, Reply
    from .engine import Engine as Bot

PROJECT_NAME = "chatforge"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def chatforge_config_model() -> type[BaseModel] | None:
    """Return the pydantic model that validates this plugin's `plugins.<name>` section."""


@hookspec
def chatforge_register_commands(register: Callable[..., None], config: Any) -> None:
    """Register slash commands: `register(name, handler, help="one line", usage="ARGS")`."""


@hookspec
def chatforge_register_adapters(register: Callable[..., None]) -> None:
    """Register platform adapters: `register(AdapterClass)`; chosen under `adapters.<name>`."""


@hookspec
def chatforge_register_generators(register: Callable[..., None]) -> None:
    """Register generator backends: `register(BackendClass)` (a `chatforge.generation.GeneratorBackend`);
    chosen by `generator.backend` (default "transformers")."""


@hookspec
def chatforge_register_memory_backends(register: Callable[..., None]) -> None:
    """Register memory stores: `register(BackendClass)` (a `chatforge.memory.MemoryBackend`);
    chosen by `memory.backend` (default "sqlite")."""


@hookspec
def chatforge_register_dialogue_corpora(register: Callable[..., None]) -> None:
    """Register dialogue corpora for `chatforge finetune --corpus NAME`: `register(name, load, description="one
    line", licence="...")`, where `load()` returns an iterable of `chatforge.finetune_data.Dialogue`. `load` is
    called only when the corpus is trained on, so import the data's package inside it."""


@hookspec
def chatforge_startup(bot: Bot, config: Any) -> None:
    """Called once the engine, generator and memory exist, before the first message."""


@hookspec
def chatforge_preprocess(message: Message, bot: Bot, config: Any) -> Message | Reply | None:
    """Inspect an incoming message: return a changed Message, a Reply to answer at once, or None."""


@hookspec(firstresult=True)
def chatforge_handle_text(
    message: Message, bot: Bot, config: Any
) -> str | Reply | Awaitable[str | Reply | None] | None:
    """Claim free text (not a command): return a reply or an awaitable of one; None passes. First result wins."""


@hookspec
def chatforge_postprocess(message: Message, reply: Reply, bot: Bot, config: Any) -> str | None:
    """Rewrite a reply before it is sent and remembered: return new text, or None to keep it."""


@hookspec
def chatforge_shutdown(bot: Bot, config: Any) -> None:
    """Called once when the bot stops, to release what `chatforge_startup` took."""
