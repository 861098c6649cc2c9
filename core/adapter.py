"""The base class of platform adapters (console, Discord, Telegram, or yours).

An adapter turns platform events into `Message`s, hands them to the engine
and sends the replies back. It is registered by a plugin through the
`chatforge_register_adapters` hook and configured under `adapters.<name>`,
validated by its `Config` model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from .engine import Engine


class Adapter:
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel] | None] = None

    def __init__(self, engine: Engine, config: Any) -> None:
        self.engine = engine
        self.config = config

    async def run(self) -> None:
        """Serve until the platform connection ends or `stop()` is called."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop receiving; let replies in flight finish."""
