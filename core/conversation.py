"""Which conversation a message belongs to: one typed key, and the one place that decides how it is stored.

A conversation is (platform, chat, thread, user); with `memory.scope: chat`
the user is None and the whole chat shares one memory. Stores keep the key
as `encode()` gives it (a JSON array: unambiguous whatever the parts
contain, and the form SQLite files have always held), and read it back with
`decode()`; nothing else takes a stored key apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from .message import Message

Scope = Literal["user", "chat"]


@dataclass(frozen=True)
class ConversationKey:
    platform: str
    chat: str
    thread: str | None = None
    user: str | None = None
    """The person whose conversation it is; None when a whole chat shares it (`memory.scope: chat`)."""

    @classmethod
    def of(cls, message: Message, scope: Scope = "user") -> ConversationKey:
        """The conversation `message` belongs to, under `memory.scope`."""
        return cls(message.platform, message.chat, message.thread, message.user if scope == "user" else None)

    @property
    def shared(self) -> bool:
        """Whether several people's lines are kept in it (the key names no user)."""
        return self.user is None

    def encode(self) -> str:
        """The stored form. Never change it: existing databases hold keys in this form."""
        return json.dumps([self.platform, self.chat, self.thread, self.user])

    @classmethod
    def decode(cls, stored: str) -> ConversationKey:
        platform, chat, thread, user = json.loads(stored)
        return cls(platform, chat, thread, user)

    def __str__(self) -> str:
        where = f"{self.platform}/{self.chat}" + (f"/{self.thread}" if self.thread else "")
        return where if self.user is None else f"{where} ({self.user})"
