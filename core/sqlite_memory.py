"""The default memory store: one SQLite file (`memory.backend: sqlite`, key `path`).

WAL mode, every turn committed as it is added (synchronous=FULL). The schema
is versioned with `PRAGMA user_version` and migrated at open; files written
by any earlier chatforge open unchanged. Several processes on one machine may
share a file (SQLite's own locking keeps each add() whole); processes on
several machines need a server, such as `memory.backend: postgres`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, ContextManager

from pydantic import BaseModel, ConfigDict

from .conversation import ConversationKey
from .hookspecs import hookimpl
from .memory import CLAIMS_KEPT_FOR, MemoryBackend, MemoryStore, MemoryUnavailable, Turn

log = logging.getLogger("chatforge.memory")

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
    # Whom a bot line answered. Older bot lines get the speaker of the user line
    # stored just before them in the same add() (the previous id, same conversation,
    # same created_at: chatforge stored each question and its answer together);
    # any other bot line stays '' (nobody's): only a whole-conversation /reset removes it.
    """
    ALTER TABLE turns ADD COLUMN reply_to TEXT NOT NULL DEFAULT '';
    UPDATE turns SET reply_to = COALESCE((
        SELECT question.user_id FROM turns AS question
        WHERE question.id = turns.id - 1 AND question.conversation = turns.conversation
          AND question.role = 'user' AND question.created_at = turns.created_at), '')
    WHERE role = 'assistant';
    """,
    # Update ids already answered (claim()), so that several processes sharing the file, or a platform
    # delivering an update twice, never answer one twice. Kept a day.
    """
    CREATE TABLE claims (event TEXT PRIMARY KEY, claimed_at REAL NOT NULL);
    """,
]

# SQL for Turn.owner.
_OWNER = "(CASE role WHEN 'assistant' THEN reply_to ELSE user_id END)"
_COLUMNS = "role, text, created_at, user_id, display_name, meta, reply_to"


def _statements(script: str) -> list[str]:
    """A migration's statements, one by one (executescript would commit the transaction they belong in)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def _turn(row: tuple) -> Turn:
    return Turn(*row[:5], meta=json.loads(row[5]), reply_to=row[6])


class MemoryFileError(RuntimeError):
    """The memory file cannot be used: what is wrong with it and what to do, in one line."""

    def __init__(self, path: Path, problem: str, advice: str) -> None:
        super().__init__(f"{path}: {problem}; {advice}")


_ELSEWHERE = "move it aside or point memory.path at another file"


def _diagnose(path: Path, exc: BaseException) -> tuple[str, str]:
    """What is wrong with a memory file that would not open, and what to do: SQLite's own words name neither."""
    text = str(exc)
    if path.is_dir():
        return "is a folder, not a file", f"point memory.path at a file, e.g. {path / 'memory.sqlite3'}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"cannot be created ({exc.strerror or exc}{where})", "point memory.path at a folder chatforge can write"
    if "disk is full" in text:
        return "cannot be written: the disk is full", "free some space or point memory.path at another disk"
    if "disk I/O error" in text:
        return ("cannot be written (disk I/O error): the disk may be full, over quota or failing",
                "free some space, check the disk, or point memory.path at another disk")
    if "readonly" in text or "unable to open" in text:
        return (f"cannot be opened for writing ({text})",
                "check the permissions of the file and its folder, or point memory.path elsewhere")
    if "not a database" in text or "malformed" in text:
        try:
            with path.open("rb") as file:
                header, size = file.read(100), path.stat().st_size
        except OSError:
            header, size = b"", 0
        if not header.startswith(b"SQLite format 3\0"):
            return "is not an SQLite database", _ELSEWHERE
        expected = 100
        if len(header) == 100 and header[24:28] == header[92:96]:  # the header's page count is valid
            page_size = int.from_bytes(header[16:18], "big")
            expected = (65536 if page_size == 1 else page_size) * int.from_bytes(header[28:32], "big")
        if size < expected:
            return f"is truncated ({size} of {expected} bytes)", _ELSEWHERE
        return f"is damaged ({text})", f'try `sqlite3 {path} ".recover"` to save what can be read; or {_ELSEWHERE}'
    return f"cannot be opened ({type(exc).__name__}: {text})", _ELSEWHERE


class SQLiteMemory:
    """Memory in one SQLite file, safe to share between the event loop and worker threads.

    A file that cannot be used raises MemoryFileError, which says why in one
    line. Damaged pages found by `PRAGMA quick_check` at start are one warning:
    the bot goes on with what can still be read rather than refuse to start.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._claims_pruned_at = 0.0
        try:
            self._open(in_memory=str(path) == ":memory:")
        except BaseException as exc:
            if hasattr(self, "_db"):
                self._db.close()  # don't leak the connection (and the open file) on a refused file
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise MemoryFileError(self.path, *_diagnose(self.path, exc)) from exc
            raise

    def _open(self, in_memory: bool) -> None:
        if not in_memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so each add() is durable on return.
        self._db = sqlite3.connect(":memory:" if in_memory else str(self.path),
                                   isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")  # first: another process may be setting the file up
        self._use_wal()
        self._db.execute("PRAGMA synchronous=FULL")
        damage = self._quick_check()
        if damage:
            log.warning('memory.path: %s is damaged (%s); serving what can still be read. To keep it, stop chatforge, '
                        'run `sqlite3 %s ".recover" | sqlite3 recovered.sqlite3` and point memory.path at the new '
                        'file; or move the damaged one aside to start afresh', self.path, damage, self.path)
        self._migrate()

    def _use_wal(self) -> None:
        """Switch the file to WAL (it stays so). SQLite answers "locked" at once, without waiting, while
        another process opens the same new file: try again for up to 5 s."""
        deadline = time.monotonic() + 5
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _quick_check(self) -> str:
        """What `PRAGMA quick_check` finds wrong, "" if nothing. SQLite may raise after its first finding."""
        found = []
        try:
            for (line,) in self._db.execute("PRAGMA quick_check(3)"):
                found.append(" ".join(line.split()))
        except sqlite3.OperationalError:
            raise  # locked, I/O error: not damage, and reported as such
        except sqlite3.DatabaseError as exc:
            found.append(str(exc))
        return "" if found == ["ok"] else "; ".join(found)

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        """Apply the migrations this file lacks, in one write transaction: processes opening the file at once
        take turns (busy_timeout), and each reads the version only once it holds the file."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self.schema_version
                if current > len(MIGRATIONS):
                    raise MemoryFileError(self.path, f"was written by a newer chatforge (schema {current} > "
                                          f"{len(MIGRATIONS)})", "upgrade chatforge, or point memory.path at another file")
                for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                    for statement in _statements(script):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {version}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def add(self, key: ConversationKey, *turns: Turn) -> None:
        rows = [(key.encode(), turn.role, turn.text, turn.user, turn.display_name, turn.created_at or time.time(),
                 json.dumps(turn.meta, default=str), turn.reply_to) for turn in turns]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO turns (conversation, role, text, user_id, display_name, created_at, meta, reply_to)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")  # durable when add() returns (synchronous=FULL)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM turns WHERE conversation = ? ORDER BY id DESC LIMIT ?",
                (key.encode(), limit),
            ).fetchall()
        return [_turn(row) for row in reversed(rows)]

    def count(self, key: ConversationKey) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM turns WHERE conversation = ?",
                                    (key.encode(),)).fetchone()[0]

    def conversations(self, platform: str | None = None) -> list[ConversationKey]:
        where = "" if platform is None else "WHERE json_extract(conversation, '$[0]') = ?"
        with self._lock:
            rows = self._db.execute(f"SELECT conversation FROM turns {where} GROUP BY conversation ORDER BY MIN(id)",
                                    () if platform is None else (platform,)).fetchall()
        return [ConversationKey.decode(row[0]) for row in rows]

    def forget(self, key: ConversationKey, user: str | None = None) -> int:
        with self._lock:
            if user is None:
                return self._db.execute("DELETE FROM turns WHERE conversation = ?", (key.encode(),)).rowcount
            return self._db.execute(f"DELETE FROM turns WHERE conversation = ? AND {_OWNER} = ?",
                                    (key.encode(), user)).rowcount

    # A person's turns: their own conversations (the key's 4th item is them), and
    # their lines and the replies to them in conversations a whole chat shares
    # (the key's 4th item is null).
    _ABOUT_USER = ("json_extract(conversation, '$[0]') = :platform AND ("
                   "json_extract(conversation, '$[3]') = :user OR "
                   f"(json_extract(conversation, '$[3]') IS NULL AND {_OWNER} = :user))")

    def about_user(self, platform: str, user: str) -> list[tuple[ConversationKey, Turn]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT conversation, {_COLUMNS} FROM turns"
                f" WHERE {self._ABOUT_USER} ORDER BY id", {"platform": platform, "user": user}).fetchall()
        return [(ConversationKey.decode(row[0]), _turn(row[1:])) for row in rows]

    def forget_user(self, platform: str, user: str) -> int:
        with self._lock:
            return self._db.execute(f"DELETE FROM turns WHERE {self._ABOUT_USER}",
                                    {"platform": platform, "user": user}).rowcount

    def purge_before(self, timestamp: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM turns WHERE created_at < ?", (timestamp,)).rowcount

    def claim(self, event: str) -> bool:
        now = time.time()
        with self._lock:
            if now - self._claims_pruned_at > 3600:
                self._db.execute("DELETE FROM claims WHERE claimed_at < ?", (now - CLAIMS_KEPT_FOR,))
                self._claims_pruned_at = now
            return self._db.execute("INSERT OR IGNORE INTO claims (event, claimed_at) VALUES (?, ?)",
                                    (event, now)).rowcount == 1

    def lock(self, key: ConversationKey) -> ContextManager[None]:
        return contextlib.nullcontext()  # the engine's queue orders a conversation within the process

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SQLiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = "~/.local/share/chatforge/memory.sqlite3"
    """SQLite file; a relative path is relative to the config file's folder."""


class SQLiteBackend(MemoryBackend):
    name = "sqlite"
    Config = SQLiteConfig

    @classmethod
    def create(cls, config: SQLiteConfig, settings: Any) -> MemoryStore:
        try:
            return SQLiteMemory(settings.resolve_path(config.path))
        except MemoryFileError as exc:
            raise MemoryUnavailable("path", str(exc)) from None

    @classmethod
    def describe(cls, config: SQLiteConfig, settings: Any) -> str:
        return f"sqlite ({settings.resolve_path(config.path)})"


@hookimpl
def chatforge_register_memory_backends(register) -> None:
    register(SQLiteBackend)
