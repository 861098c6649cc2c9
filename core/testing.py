"""An offline test kit: a deterministic fake generator and a bot you can talk to.

    from chatforge.testing import make_bot

    def test_hello():
        bot = make_bot(plugins={"hello": my_plugin_module})
        assert bot.ask("/hello") == "Hello!"

No model, no network, no files: memory lives in the process. With chatforge
installed, pytest also gets the fixtures `chatforge_bot`, `fake_generator` and
`chatforge_config` (see `chatforge.pytest_plugin`). A memory backend's author
runs `MemoryStoreContract`, the suite every store passes, on their store.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import Settings
from .engine import Engine
from .generation import OnText, count_usage
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
        # Words stand for tokens, so that what reads usage (the HTTP API) can be tested against known counts.
        count_usage(sum(len(turn.text.split()) for turn in history) + len(text.split()), len(answer.split()))
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
    """A bot to talk to in tests, as a test adapter would: `bot.ask("/roll")` returns the reply's text.

    `ask`/`send` run on the bot's own event loop and return when the reply is
    ready; inside an async test use `ask_async`/`send_async` instead.
    """

    __test__ = False  # not a pytest test class

    engine: Engine
    generator: Any
    memory: MemoryStore
    defaults: dict[str, Any] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def message(self, text: str, **fields: Any) -> Message:
        """The Message an adapter would build; `fields` override the defaults (user, chat, platform...)."""
        return Message(text=text, **{**self.defaults, **fields})

    async def send_async(self, text: str, **fields: Any) -> Reply | None:
        return await self.engine.handle(self.message(text, **fields))

    async def ask_async(self, text: str, **fields: Any) -> str | None:
        reply = await self.send_async(text, **fields)
        return reply.text if reply is not None else None

    def send(self, text: str, **fields: Any) -> Reply | None:
        """Send one message; returns the Reply (None for a deliberate silence)."""
        return self._run(self.send_async(text, **fields))

    def ask(self, text: str, **fields: Any) -> str | None:
        """Send one message; returns the reply's text (None for a deliberate silence)."""
        return self._run(self.ask_async(text, **fields))

    def history(self, **fields: Any) -> list[Turn]:
        """What the bot remembers of the conversation these message fields belong to."""
        return self.engine.history(self.message("", **fields))

    def close(self) -> None:
        """Run the plugins' shutdown hooks and release the loop."""
        self._run(self.engine.close())
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _run(self, coroutine: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)


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

    config = dict(config or {})
    # Tests send messages as fast as they can: no rate limit unless the test sets one.
    config["limits"] = {"rate_per_minute": 1e9, "rate_burst": 10**9, **(config.get("limits") or {})}
    settings = load_settings_from_dict(config)
    host = PluginHost(settings, strict=strict)
    issues = host.load(extra_plugins=plugins)
    if issues:
        raise ConfigError(issues, "<test config>")
    generator = generator if generator is not None else FakeGenerator()
    memory = memory if memory is not None else InMemoryMemory()
    engine = create_engine(settings, host, generator=generator, memory=memory)
    defaults = {"platform": "test", "chat": "test-chat", "user": "tester", "display_name": "Tester",
                **message_defaults}
    return TestBot(engine, generator, memory, defaults)


def __getattr__(name: str) -> Any:
    # The store conformance suite needs pytest; import it only when asked for.
    if name == "MemoryStoreContract":
        from .memory_contract import MemoryStoreContract
        return MemoryStoreContract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
