"""Conversation memory: what the bot remembers of each conversation.

A conversation is identified by (platform, chat, thread, user); with
`scope: chat` the user is left out so a whole group chat shares one memory.
`SQLiteMemory` is the default (one file, WAL, every turn committed as it is
added); `InMemoryMemory` is for tests and throw-away sessions.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .message import Message

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    """One remembered line of a conversation."""

    role: Role
    text: str
    created_at: float = 0.0
    user: str = ""
    display_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """What plugins noted about the message (e.g. its sentiment); kept as JSON."""


def conversation_key(message: Message, scope: Literal["user", "chat"] = "user") -> str:
    """A stable, unambiguous key for the conversation a message belongs to."""
    user = message.user if scope == "user" else None
    return json.dumps([message.platform, message.chat, message.thread, user])


class MemoryStore(Protocol):
    """What the engine needs from a memory backend."""

    def add(self, key: str, turn: Turn) -> None: ...
    def recent(self, key: str, limit: int) -> list[Turn]:
        """The newest `limit` turns, oldest first."""
        ...
    def forget(self, key: str) -> int:
        """Delete the conversation; returns how many turns were deleted."""
        ...
    def close(self) -> None: ...


class InMemoryMemory:
    """Memory that lives as long as the process: for tests and experiments."""

    def __init__(self) -> None:
        self._turns: dict[str, list[Turn]] = {}

    def add(self, key: str, turn: Turn) -> None:
        self._turns.setdefault(key, []).append(turn)

    def recent(self, key: str, limit: int) -> list[Turn]:
        return list(self._turns.get(key, [])[-limit:]) if limit > 0 else []

    def forget(self, key: str) -> int:
        return len(self._turns.pop(key, []))

    def close(self) -> None:
        pass


# Each entry upgrades the schema by one version; PRAGMA user_version records
# how many have been applied. Append new migrations, never edit old ones.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        text TEXT NOT NULL,
        user_id TEXT NOT NULL DEFAULT '',
        display_name TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE INDEX turns_by_conversation ON turns (conversation, id);
    """,
    """
    ALTER TABLE turns ADD COLUMN meta TEXT NOT NULL DEFAULT '{}';
    """,
]


class SQLiteMemory:
    """Memory in one SQLite file, safe to share between the event loop and worker threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, so each add() is durable on return.
        self._db = sqlite3.connect(
            str(self.path) if str(path) != ":memory:" else ":memory:",
            isolation_level=None,
            check_same_thread=False,
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        try:
            self._migrate()
        except BaseException:
            self._db.close()  # don't leak the connection (and the open file) on a refused schema
            raise

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self._lock:
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path}: memory schema version {current} is newer than this "
                    f"chatforge understands ({len(MIGRATIONS)}); upgrade chatforge"
                )
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                self._db.executescript(
                    f"BEGIN; {script}; PRAGMA user_version = {version}; COMMIT;"
                )

    def add(self, key: str, turn: Turn) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO turns (conversation, role, text, user_id, display_name, created_at, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, turn.role, turn.text, turn.user, turn.display_name,
                 turn.created_at or time.time(), json.dumps(turn.meta, default=str)),
            )

    def recent(self, key: str, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT role, text, created_at, user_id, display_name, meta FROM turns"
                " WHERE conversation = ? ORDER BY id DESC LIMIT ?",
                (key, limit),
            ).fetchall()
        return [Turn(*row[:5], meta=json.loads(row[5])) for row in reversed(rows)]

    def forget(self, key: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM turns WHERE conversation = ?", (key,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
