"""The base class of platform adapters (console, Discord, Telegram, or yours).

An adapter turns platform events into `Message`s, hands them to the engine
and sends the replies back. It is registered by a plugin through the
`chatforge_register_adapters` hook and configured under `adapters.<name>`,
validated by its `Config` model.

Lifecycle: `chatforge run` calls `run()` for every enabled adapter side by
side; on SIGINT or SIGTERM it calls `stop()`, waits (bounded by
`bot.shutdown_timeout`) for `run()` to return, then closes the memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Coroutine

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .engine import Engine


class AdapterError(Exception):
    """A problem the operator must fix in the config (a missing or rejected token...).

    `chatforge run` exits with status 2 and this message; it names the config
    path and never contains a secret.
    """


class PlatformConfig(BaseModel):
    """Settings every chat-platform adapter has; subclass it for `adapters.<name>`."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    token: SecretStr = SecretStr("")
    """The bot's token; keep it in the environment: token: ${DISCORD_TOKEN}. Never logged."""
    stream: bool = False
    """Send the first words at once, then edit the message as the model writes."""
    stream_interval: float = Field(1.5, gt=0)
    """Seconds between edits while streaming (Telegram refuses more than about one a second)."""


class Adapter:
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel] | None] = None
    token_env: ClassVar[str | None] = None
    """The environment variable the docs keep this adapter's token in (DISCORD_TOKEN...). Setting it says
    the adapter cannot start without `adapters.<name>.token`: `chatforge run` and `config check` then
    report a missing one before anything slow, naming this variable."""

    def __init__(self, engine: Engine, config: Any) -> None:
        self.engine = engine
        self.config = config
        self.in_flight: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Serve until `stop()` is called.

        While the platform cannot be reached, keep trying (with backoff, a warning a try); once connected,
        call `announce()`. Return only when stopped: giving up for good is an exception (AdapterError for
        what the operator must fix), and `chatforge run` exits non-zero so that a supervisor can act.
        """
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop receiving; `run()` should return once the replies in flight are sent."""

    def track(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run the handling of one message as a task that `wait_in_flight` waits for."""
        task = asyncio.create_task(coroutine)
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        return task

    async def wait_in_flight(self) -> None:
        """Wait for the replies being worked on (the caller bounds how long)."""
        if self.in_flight:
            await asyncio.gather(*self.in_flight, return_exceptions=True)

    def require_token(self) -> str:
        """The token's value, or an AdapterError naming the config key (never the value)."""
        token = self.config.token.get_secret_value().strip()
        if not token:
            raise AdapterError(f"adapters.{self.name}.token: no token is set; {self.token_hint()}")
        return token

    @classmethod
    def token_hint(cls) -> str:
        """Where a missing token should go, in the words of the docs."""
        variable = cls.token_env or f"{cls.name.upper()}_TOKEN"
        return f"put it in the environment as {variable} and write token: ${{{variable}}}"

    def announce(self, account: str) -> None:
        """Log, once the platform has accepted the bot, the one line saying so: "discord: connected as NAME".

        It is news, not a warning, so it is an INFO record; but an operator (and a supervisor's log) should
        see that each adapter came up, so it is shown at the default level, WARNING, too. Only
        `logging.level: ERROR` hides it.
        """
        log = logging.getLogger("chatforge")
        if log.isEnabledFor(logging.WARNING):
            log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "%s: connected as %s",
                                      (self.name, account), None))
