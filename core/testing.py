"""An offline test kit: a deterministic fake generator and a bot you can talk to.

    from chatforge.testing import make_bot

    async def test_hello():
        bot = make_bot(plugins={"hello": my_plugin_module})
        assert await bot.ask("/hello") == "Hello!"

No model, no network, no files: memory lives in the process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import Settings
from .engine import Engine
from .generator import OnText
from .memory import InMemoryMemory, MemoryStore, Turn
from .message import Message, Reply
from .plugin_manager import PluginHost


class FakeGenerator:
    """A generator that answers instantly and predictably: `echo: <text>` by default.

    `respond(history, text)` can be replaced to script answers; every call is
    recorded in `calls` as (history, text) so tests can check what the model saw.
    """

    name = "fake"

    def __init__(self, respond: Callable[[Sequence[Turn], str], str] | None = None) -> None:
        self.respond = respond or (lambda history, text: f"echo: {text}")
        self.calls: list[tuple[list[Turn], str]] = []

    async def reply(self, history: Sequence[Turn], text: str, on_text: OnText | None = None) -> str:
        self.calls.append((list(history), text))
        answer = self.respond(history, text)
        if on_text is not None:
            for index, word in enumerate(answer.split(" ")):
                on_text(word if index == 0 else " " + word)
        return answer

    async def complete(self, instruction: str, max_new_tokens: int | None = None) -> str:
        return await self.reply([], instruction)

    def close(self) -> None:
        pass


@dataclass
class TestBot:
    """An engine plus helpers to talk to it as a given user in a given chat."""

    __test__ = False  # not a pytest test class

    engine: Engine
    generator: Any
    memory: MemoryStore
    defaults: dict[str, Any] = field(default_factory=dict)

    def message(self, text: str, **fields: Any) -> Message:
        return Message(text=text, **{**self.defaults, **fields})

    async def send(self, text: str, **fields: Any) -> Reply | None:
        """Send one message; returns the Reply (None for a deliberate silence)."""
        return await self.engine.handle(self.message(text, **fields))

    async def ask(self, text: str, **fields: Any) -> str | None:
        """Send one message; returns the reply's text (None for silence)."""
        reply = await self.send(text, **fields)
        return reply.text if reply is not None else None


def make_bot(
    config: dict[str, Any] | None = None,
    plugins: dict[str, Any] | None = None,
    generator: Any = None,
    memory: MemoryStore | None = None,
    strict: bool = True,
    **message_defaults: Any,
) -> TestBot:
    """A bot with the built-in plugins plus `plugins`, a fake generator and in-memory memory.

    `config` is the YAML config as a dict (it is validated like a file).
    Strict by default, so a plugin bug fails the test instead of being logged.
    """
    from .app import create_engine
    from .config import ConfigError, load_settings_from_dict

    settings = load_settings_from_dict(config or {})
    host = PluginHost(settings, strict=strict)
    issues = host.load(extra_plugins=plugins)
    if issues:
        raise ConfigError(issues, "<test config>")
    generator = generator if generator is not None else FakeGenerator()
    memory = memory if memory is not None else InMemoryMemory()
    engine = create_engine(settings, host, generator=generator, memory=memory)
    return TestBot(engine, generator, memory, message_defaults)
