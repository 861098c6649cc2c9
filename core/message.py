"""The neutral message and reply types that every adapter and plugin speaks.

Adapters turn a platform event into a `Message`; the engine answers with a
`Reply`. Nothing here knows about Discord, Telegram or the console.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Message:
    """One incoming message, as the engine and plugins see it."""

    text: str
    platform: str = "console"
    chat: str = "console"
    user: str = "user"
    display_name: str = ""
    thread: str | None = None
    direct: bool = True
    """True in a private chat (DM) with the bot."""
    mentioned: bool = False
    """True when the bot was addressed by name or @mention in a group."""
    raw: Any = field(default=None, compare=False, repr=False)
    """The platform's own event object, for adapters that need it back."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """Notes plugins attach in pre-processing (e.g. sentiment); remembered with the turn."""

    def replace(self, **changes: Any) -> Message:
        """A copy with some fields changed (messages are immutable)."""
        return dataclasses.replace(self, **changes)


@dataclass
class Reply:
    """What the bot answers. An empty `text` means a deliberate silence."""

    text: str
    source: str = "generator"
    """Who produced it: "generator", a command such as "/help", or a plugin name."""
    remember: bool = True
    """Whether the turn goes into conversation memory (commands usually don't)."""

    def __bool__(self) -> bool:
        return bool(self.text)
