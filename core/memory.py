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

    def add(self, key: str, *turns: Turn) -> None:
        """Append turns to a conversation, all or none (a question and its answer go in together)."""
        ...
    def recent(self, key: str, limit: int) -> list[Turn]:
        """The newest `limit` turns, oldest first."""
        ...
    def count(self, key: str) -> int:
        """How many turns the conversation has."""
        ...
    def forget(self, key: str) -> int:
        """Delete the conversation; returns how many turns were deleted."""
        ...
    def about_user(self, platform: str, user: str) -> list[tuple[str, Turn]]:
        """Every turn kept about a person: their own conversations whole, and their lines in shared ones."""
        ...
    def forget_user(self, platform: str, user: str) -> int:
        """Delete everything `about_user` returns; how many turns were deleted."""
        ...
    def purge_before(self, timestamp: float) -> int:
        """Delete turns older than `timestamp` (the retention period); how many."""
        ...
    def close(self) -> None: ...


def belongs_to(key: str, turn: Turn, platform: str, user: str) -> bool:
    """Whether a turn is about this person: in their own conversation, or their line in a shared one."""
    key_platform, _chat, _thread, key_user = json.loads(key)
    return key_platform == platform and (key_user == user or (key_user is None and turn.user == user))


class InMemoryMemory:
    """Memory that lives as long as the process: for tests and experiments."""

    def __init__(self) -> None:
        self._turns: dict[str, list[Turn]] = {}

    def add(self, key: str, *turns: Turn) -> None:
        self._turns.setdefault(key, []).extend(turns)

    def recent(self, key: str, limit: int) -> list[Turn]:
        return list(self._turns.get(key, [])[-limit:]) if limit > 0 else []

    def count(self, key: str) -> int:
        return len(self._turns.get(key, []))

    def forget(self, key: str) -> int:
        return len(self._turns.pop(key, []))

    def about_user(self, platform: str, user: str) -> list[tuple[str, Turn]]:
        return [(key, turn) for key, turns in self._turns.items() for turn in turns
                if belongs_to(key, turn, platform, user)]

    def forget_user(self, platform: str, user: str) -> int:
        return self._remove(lambda key, turn: belongs_to(key, turn, platform, user))

    def purge_before(self, timestamp: float) -> int:
        return self._remove(lambda key, turn: turn.created_at < timestamp)

    def _remove(self, doomed) -> int:
        removed = 0
        for key in list(self._turns):
            kept = [turn for turn in self._turns[key] if not doomed(key, turn)]
            removed += len(self._turns[key]) - len(kept)
            if kept:
                self._turns[key] = kept
            else:
                del self._turns[key]
        return removed

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

    def add(self, key: str, *turns: Turn) -> None:
        rows = [(key, turn.role, turn.text, turn.user, turn.display_name, turn.created_at or time.time(),
                 json.dumps(turn.meta, default=str)) for turn in turns]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO turns (conversation, role, text, user_id, display_name, created_at, meta)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")  # durable when add() returns (synchronous=FULL)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

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

    def count(self, key: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM turns WHERE conversation = ?", (key,)).fetchone()[0]

    def forget(self, key: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM turns WHERE conversation = ?", (key,)).rowcount

    # A person's turns: their own conversations (the key's 4th item is them), and
    # their lines in conversations a whole chat shares (the key's 4th item is null).
    _ABOUT_USER = ("json_extract(conversation, '$[0]') = :platform AND ("
                   "json_extract(conversation, '$[3]') = :user OR "
                   "(json_extract(conversation, '$[3]') IS NULL AND user_id = :user))")

    def about_user(self, platform: str, user: str) -> list[tuple[str, Turn]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT conversation, role, text, created_at, user_id, display_name, meta FROM turns"
                f" WHERE {self._ABOUT_USER} ORDER BY id", {"platform": platform, "user": user}).fetchall()
        return [(row[0], Turn(*row[1:6], meta=json.loads(row[6]))) for row in rows]

    def forget_user(self, platform: str, user: str) -> int:
        with self._lock:
            return self._db.execute(f"DELETE FROM turns WHERE {self._ABOUT_USER}",
                                    {"platform": platform, "user": user}).rowcount

    def purge_before(self, timestamp: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM turns WHERE created_at < ?", (timestamp,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
