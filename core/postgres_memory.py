"""`memory.backend: postgres`: conversation memory in PostgreSQL, shared by any number of bot processes.

    memory:
      backend: postgres
      url: ${DATABASE_URL}     # postgresql://user:password@host:5432/database
      pool_size: 10            # connections at most for reads and writes (as many again for locks)
      timeout: 5               # seconds a call may wait for a connection or a statement

The schema is versioned (table `chatforge_schema`) and migrated at start, one
process at a time (an advisory lock); several processes may start at once.
Each `add()` is one transaction holding the conversation's transaction lock,
so a question and its answer are never split by another process's pair.
`lock(key)` is a session advisory lock on a connection of a second, separate
pool: the engine holds it for a whole answer, and lock holders must never take
the connections that reads and writes need. A session lock dies with its
connection, so a process that dies frees its conversations.

The conversation's order comes before one more turn: a turn answered without
its lock (lock() failed, or the connection holding it broke) is not stored
(`UnlockedTurn`), since another process may have stored a later one meanwhile.

A server that cannot be reached never stops the bot: the store starts anyway
(one warning), each call fails within `timeout` (a server that refuses, at
once: a call that the pool cannot serve within a second asks the server
itself), and once one has failed, every call fails at once while a background
thread tries the server every `RETRY_AFTER` seconds; the engine then answers
without history and says which turn it lost. A server that accepts and never answers has the call's connection cut
after `timeout` (`_Watchdog`). When the server is back (one warning), the pool
reconnects and migrations that were pending run; a restart between two calls
costs nothing (dead pooled connections are noticed without a round trip). A
URL that can never work (not a postgresql:// URL, a refused login, no such
database, a schema from a newer chatforge) is `MemoryUnavailable` at start. No
message shows the password.

psycopg (3) is imported only when this backend is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any, Callable, ContextManager, Iterator, TypeVar
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from . import redaction
from .conversation import ConversationKey
from .hookspecs import hookimpl
from .memory import CLAIMS_KEPT_FOR, MemoryBackend, MemoryStore, MemoryUnavailable, Turn

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("chatforge.memory")

T = TypeVar("T")

RETRY_AFTER = 0.5
"""While the server is down, it is tried this often (in the background, never by a call: calls fail at once)."""
LOCK_TIMEOUT = 120.0
"""Seconds `lock()` waits for a conversation another process is answering before giving up."""
SCHEMES = ("postgresql", "postgres")
_MIGRATION_LOCK = 7163082359895454311  # b"chatforg": the advisory lock held while the schema is migrated
_ADD_SEED, _LOCK_SEED = 0, 1  # hashtextextended(conversation, seed): add()'s transaction lock, lock()'s session lock

# Each entry upgrades the schema by one version; chatforge_schema has a row per version applied.
# Append new migrations, never edit old ones.
MIGRATIONS: list[str] = [
    # `conversation` is ConversationKey.encode(); `platform` and `key_user` (null in a conversation a whole
    # chat shares) are the key's parts that about_user()/forget_user() select by. `meta` is json, not jsonb:
    # it keeps exactly what was written (jsonb refuses \u0000 and reorders keys).
    """
    CREATE TABLE chatforge_turns (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation text NOT NULL,
        platform text NOT NULL,
        key_user text,
        role text NOT NULL CHECK (role IN ('user', 'assistant')),
        text text NOT NULL,
        user_id text NOT NULL DEFAULT '',
        display_name text NOT NULL DEFAULT '',
        created_at double precision NOT NULL,
        meta json NOT NULL DEFAULT '{}',
        reply_to text NOT NULL DEFAULT ''
    );
    CREATE INDEX chatforge_turns_by_conversation ON chatforge_turns (conversation, id);
    CREATE INDEX chatforge_turns_by_user ON chatforge_turns (platform, key_user);
    CREATE INDEX chatforge_turns_by_time ON chatforge_turns (created_at);
    """,
    # Update ids already answered (claim()): an update delivered twice, or to two processes, is answered once.
    """
    CREATE TABLE chatforge_claims (event text PRIMARY KEY, claimed_at double precision NOT NULL);
    CREATE INDEX chatforge_claims_by_time ON chatforge_claims (claimed_at);
    """,
]

# SQL for Turn.owner, and the turns about a person (as chatforge.memory.belongs_to).
_OWNER = "(CASE role WHEN 'assistant' THEN reply_to ELSE user_id END)"
_ABOUT_USER = f"platform = %(platform)s AND (key_user = %(user)s OR (key_user IS NULL AND {_OWNER} = %(user)s))"
_COLUMNS = "role, text, created_at, user_id, display_name, meta, reply_to"
_INSERT = ("INSERT INTO chatforge_turns (conversation, platform, key_user, role, text, user_id, display_name,"
           " created_at, meta, reply_to) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::json, %s)")


def _turn(row: tuple) -> Turn:
    role, text, created_at, user, display_name, meta, reply_to = row
    return Turn(role, text, created_at, user, display_name, meta=meta if isinstance(meta, dict) else json.loads(meta),
                reply_to=reply_to)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL: it becomes U+FFFD rather than cost the turn."""
    return value.replace("\x00", "\ufffd")


def _has_news(conn: Any) -> bool:
    """Whether an idle connection has something to read: one the server closed (a restart) has its goodbye
    waiting. Without a round trip."""
    if conn.closed or conn.broken:
        return True
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class DatabaseUnreachable(ConnectionError):
    """PostgreSQL cannot be reached: this call failed, or an earlier one did and the server is not back yet."""


class LockTimeout(TimeoutError):
    """Another process held the conversation's lock for longer than the lock timeout."""


class UnlockedTurn(RuntimeError):
    """A turn not stored because its conversation was answered without its lock (it could not be taken, or
    was lost with its connection): another process may have stored a later turn meanwhile, and the
    conversation's order comes first."""


class _Refused(Exception):
    """The database can never be used as configured (a newer schema, no right to create the tables)."""


# ------------------------------------------------------------------ URLs, never with their password

def mask_url(url: str) -> str:
    """The URL with its password shown as *** (in the user part and in a `password=` parameter)."""
    scheme, separator, rest = url.partition("://")
    if not separator:  # not a URL: a "host=... password=..." string, say
        return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\1{redaction.MASK}", url)
    query_at = rest.find("?")
    query_at = len(rest) if query_at < 0 else query_at
    at = rest.rfind("@", 0, query_at)  # a password may hold an unencoded "/": the user part ends at the last "@"
    if at >= 0 and ":" in rest[:at]:
        rest = f"{rest[:at].split(':', 1)[0]}:{redaction.MASK}{rest[at:]}"
        query_at = rest.find("?")
        query_at = len(rest) if query_at < 0 else query_at
    query = re.sub(r"(?i)((?:^|&)password=)[^&]*", rf"\1{redaction.MASK}", rest[query_at + 1:])
    return f"{scheme}{separator}{rest[:query_at]}" + (f"?{query}" if query_at < len(rest) else "")


def _passwords(url: str) -> set[str]:
    """Every form the URL's password may be quoted in (as written, and percent-decoded)."""
    found: set[str] = set()
    _, separator, rest = url.partition("://")
    if separator:
        query_at = rest.find("?")
        query_at = len(rest) if query_at < 0 else query_at
        at = rest.rfind("@", 0, query_at)
        if at >= 0 and ":" in rest[:at]:
            found.add(rest[:at].split(":", 1)[1])
        found.update(re.findall(r"(?i)(?:^|&)password=([^&]*)", rest[query_at + 1:]))
    found.update(match[1] or match[2] for match in re.finditer(r"(?i)password\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S+))",
                                                                url if not separator else ""))
    return {form for secret in found if secret for form in (secret, unquote(secret))}


def _where(params: dict[str, Any]) -> str:
    """host:port (each of them, for a URL naming several hosts)."""
    hosts = str(params.get("host") or params.get("hostaddr") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    ports += [ports[-1]] * (len(hosts) - len(ports))
    return ", ".join(f"{host}:{port}" for host, port in zip(hosts, ports))


_LOGIN_REFUSED = re.compile(r'authentication failed|no password supplied|no pg_hba\.conf entry|password is required|'
                            r'role ".*" does not exist|role ".*" is not permitted to log in|SSL required')
_BAD_OPTION = re.compile(r"^(invalid .*(value|option)|unrecognized|invalid connection option)", re.IGNORECASE)


# ------------------------------------------------------------------ the store

class PostgresMemory:
    """Memory in a PostgreSQL database: thread-safe, and shared with other processes on the same database."""

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 5.0,
                 lock_timeout: float = LOCK_TIMEOUT) -> None:
        self._url = url
        self._secrets = _passwords(url)
        redaction.REDACTOR.add(self._secrets)  # whatever a library may log
        self.shown_url = self._hide(mask_url(url))
        self.pool_size = pool_size
        self.concurrent_calls = pool_size
        """How many calls the engine makes at once: one per pooled connection."""
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        params = self._parse(url)
        self.where = _where(params)
        defaults = {"connect_timeout": max(2, math.ceil(timeout)), "application_name": "chatforge",
                    # a network that loses the server breaks the connection rather than leave a call waiting
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                    "tcp_user_timeout": int(max(timeout, 2.0) * 1000)}
        self._connect_options = {key: value for key, value in defaults.items() if key not in params}
        self._connect_seconds = int(params.get("connect_timeout") or self._connect_options["connect_timeout"])
        self._first_wait = min(1.0, max(0.2, timeout / 5))
        """How long a call waits for the pool before asking the server itself whether it is there."""
        self._state = threading.Condition()
        self._down = False
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        self._reason = ""
        self._migrated = False
        self._claims_pruned_at = 0.0
        self._watchdog = _Watchdog()
        self._locks = threading.Lock()
        self._held: dict[ConversationKey, Any] = {}
        """Conversations this process is answering under their lock: the connection holding it."""
        self._unlocked: set[ConversationKey] = set()
        """Conversations being answered without their lock (lock() failed): their turn is not stored."""
        # The pool's own warnings ("error connecting in 'pool-1'") would repeat at every retry while the server
        # is down; this store says it once, and again when the server is back.
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
            pool_log.setLevel(logging.ERROR)
        try:
            self._start()
            self._pool = self._new_pool("chatforge-memory", "connections for reads and writes", self._configure)
            self._lock_pool = self._new_pool("chatforge-memory-locks", "connections for conversation locks",
                                             self._configure_for_locks)
        except BaseException:
            self._watchdog.stop()
            raise
        if self._down:
            self._watch_for_the_server()

    # ------------------------------------------------------------ starting

    def _parse(self, url: str) -> dict[str, Any]:
        from psycopg.conninfo import conninfo_to_dict

        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme not in SCHEMES:
            raise MemoryUnavailable("url", f"must be a postgresql:// URL (postgresql://user:password@host:5432/"
                                           f"database), got {self._hide(mask_url(url)) or 'nothing'}")
        try:
            return conninfo_to_dict(url)
        except Exception as exc:  # noqa: BLE001 - libpq's words: the URL as written, password and all
            raise MemoryUnavailable("url", f"cannot be parsed ({self._reason_of(exc)})") from None

    def _start(self) -> None:
        """The first connection: refuse a URL that can never work, migrate, or note that the server is down."""
        import psycopg

        try:
            conn = self._connect()
        except psycopg.Error as exc:
            reason = self._reason_of(exc)
            refusal = self._refusal(reason)
            if refusal:
                raise MemoryUnavailable("url", refusal) from None
            with self._state:
                self._down, self._reason = True, reason
            log.warning("memory.url: cannot reach PostgreSQL at %s (%s); replies are sent, turns are lost until "
                        "it returns", self.where, reason)
            return
        with conn:
            try:
                with self._watchdog.watching(conn, self.lock_timeout + 1):
                    self._migrate(conn)
            except _Refused as exc:
                raise MemoryUnavailable("url", str(exc)) from None
            except psycopg.Error as exc:
                if conn.broken:
                    with self._state:
                        self._down, self._reason = True, self._reason_of(exc)
                    log.warning("memory.url: lost PostgreSQL at %s while setting up (%s); replies are sent, turns "
                                "are lost until it returns", self.where, self._reason)
                    return
                raise MemoryUnavailable("url", f"{self.shown_url}: cannot set up chatforge's tables "
                                               f"({self._reason_of(exc)})") from None

    def _refusal(self, reason: str) -> str | None:
        """What makes a failed first connection permanent (the bot must not start), or None (the server is down)."""
        if _LOGIN_REFUSED.search(reason):  # not "too many connections for role": that one passes
            return f"PostgreSQL at {self.where} refused the login ({reason})"
        if re.search(r'database ".*" does not exist', reason):
            return f"PostgreSQL at {self.where}: {reason} (create it, or correct the URL)"
        if _BAD_OPTION.search(reason):
            return f"is not a usable PostgreSQL URL ({reason})"
        return None

    def _connect(self, seconds: int | None = None) -> "psycopg.Connection":
        """A connection of its own (start, and trying the server), its waits bounded (`seconds` to connect)."""
        import psycopg

        options = {**self._connect_options, **({"connect_timeout": seconds} if seconds else {})}
        conn = psycopg.connect(self._url, autocommit=True, **options)
        try:
            self._settings(conn, statement=self.lock_timeout, lock=self.lock_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: "psycopg.Connection") -> None:
        import psycopg

        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))  # one process at a time
                conn.execute("CREATE TABLE IF NOT EXISTS chatforge_schema"
                             " (version integer PRIMARY KEY, applied_at double precision NOT NULL)")
                current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM chatforge_schema").fetchone()[0]
                if current > len(MIGRATIONS):
                    raise _Refused(f"the database at {self.shown_url} was written by a newer chatforge (schema "
                                   f"{current} > {len(MIGRATIONS)}); upgrade chatforge, or point memory.url at "
                                   "another database")
                for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                    conn.execute(script)
                    conn.execute("INSERT INTO chatforge_schema (version, applied_at) VALUES (%s, %s)",
                                 (version, time.time()))
                    log.info("memory: %s migrated to schema %d", self.shown_url, version)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise _Refused(f"the user of {self.shown_url} may not create chatforge's tables ({self._reason_of(exc)});"
                           " grant it CREATE on the schema, or use a database it owns") from None
        self._migrated = True

    def _new_pool(self, name: str, purpose: str, configure: Callable[[Any], None]) -> "_Pool":
        from psycopg_pool import ConnectionPool

        wrapper = _Pool(purpose)
        wrapper.pool = ConnectionPool(
            self._url, kwargs={"autocommit": True, **self._connect_options}, min_size=0, max_size=self.pool_size,
            open=False, timeout=self.timeout, configure=configure, check=wrapper.check_idle,
            name=name, reconnect_timeout=max(self.timeout, 2.0))
        wrapper.pool.open(wait=False)  # connects on demand: a server that is down does not hold up the start
        return wrapper

    @staticmethod
    def _settings(conn: Any, statement: float, lock: float | None = None, **more: str) -> None:
        values = {"statement_timeout": f"{int(statement * 1000)}ms", **more}
        if lock is not None:
            values["lock_timeout"] = f"{int(lock * 1000)}ms"
        conn.execute("SELECT " + ", ".join("set_config(%s, %s, false)" for _ in values),
                     [part for item in values.items() for part in item])

    def _configure(self, conn: Any) -> None:
        self._settings(conn, statement=self.timeout)

    def _configure_for_locks(self, conn: Any) -> None:
        # The server's keepalives: a process whose machine vanished loses its conversations' locks within a
        # minute, not the system's two hours.
        self._settings(conn, statement=self.lock_timeout + self.timeout, lock=self.lock_timeout,
                       tcp_keepalives_idle="10", tcp_keepalives_interval="5", tcp_keepalives_count="3")

    # ------------------------------------------------------------ messages

    def _hide(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if len(secret) >= 3:
                text = text.replace(secret, redaction.MASK)
        return text

    def _reason_of(self, exc: BaseException) -> str:
        """psycopg's message in a few words: 'Connection refused', 'password authentication failed for ...'."""
        text = str(exc).replace(self._url, self.shown_url)
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        if "failed: " in reason:  # 'connection to server at "127.0.0.1", port 5432 failed: Connection refused'
            reason = reason.rsplit("failed: ", 1)[1]
        reason = re.sub(r"^(connection is bad|FATAL|ERROR):\s*", "", reason)
        return self._hide(" ".join(reason.split()) or type(exc).__name__)

    def _unreachable(self) -> DatabaseUnreachable:
        return DatabaseUnreachable(f"PostgreSQL at {self.where} is unreachable ({self._reason})")

    # ------------------------------------------------------------ the outage state

    def _went_down(self, reason: str) -> DatabaseUnreachable:
        with self._state:
            first = not self._down
            self._down, self._reason = True, reason
        if first:
            log.warning("memory: lost PostgreSQL at %s (%s); replies are sent, turns are lost until it returns",
                        self.where, reason)
            self._watch_for_the_server()
        return self._unreachable()

    def _ensure_up(self) -> None:
        """Fail at once while the server is down (the background try says when it is back)."""
        with self._state:
            if self._down:
                raise self._unreachable()

    def _reach(self, seconds: int) -> None:
        """Raise DatabaseUnreachable (noting the outage) unless the server takes a connection of its own."""
        import psycopg

        try:
            self._connect(seconds).close()
        except psycopg.Error as exc:
            raise self._went_down(self._reason_of(exc)) from None

    def _watch_for_the_server(self) -> None:
        with self._state:
            if self._closed.is_set() or (self._prober is not None and self._prober.is_alive()):
                return
            self._prober = threading.Thread(target=self._until_back, name="chatforge-postgres-retry", daemon=True)
            self._prober.start()

    def _until_back(self) -> None:
        """While the server is down: try it every RETRY_AFTER seconds with a connection of its own, migrate if
        that is still to be done, and once it answers put the store back in service."""
        import psycopg

        told: set[str] = set()
        while not self._closed.wait(RETRY_AFTER):
            try:
                with self._connect() as conn:
                    if not self._migrated:
                        with self._watchdog.watching(conn, self.lock_timeout + 1):
                            self._migrate(conn)
            except _Refused as exc:  # reachable, and unusable: say so once
                with self._state:
                    self._reason = str(exc)
                if str(exc) not in told:
                    told.add(str(exc))
                    log.error("memory.url: %s; turns are lost until then", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - still down (psycopg.Error), or anything else: try again
                with self._state:
                    self._reason = self._reason_of(exc) if isinstance(exc, psycopg.Error) else \
                        f"{type(exc).__name__}: {self._hide(str(exc))}"
                continue
            for pool in (self._pool, self._lock_pool):
                with contextlib.suppress(Exception):
                    pool.check()  # drop at once the pooled connections the outage killed
            with self._state:  # with _prober cleared in the same step, a new outage starts a new watcher
                self._down = False
                self._prober = None
            log.warning("memory: PostgreSQL at %s is back; turns are stored again", self.where)
            return

    def _getconn(self, pool: "_Pool", patience: float) -> Any:
        """A connection of `pool`. No connection within `timeout` while some are free to be made is an outage;
        while all are in use (held by other calls, or by lock holders) it is a wait, of `patience` at most."""
        from psycopg_pool import PoolTimeout

        started, probed = time.monotonic(), False
        while True:
            self._ensure_up()
            elapsed = time.monotonic() - started
            if pool.exhausted:
                wait = min(self.timeout, patience - elapsed)
            else:  # the pool keeps retrying a server that refuses: after a moment, ask the server itself
                wait = self.timeout - elapsed if probed else min(self._first_wait, self.timeout - elapsed)
            try:
                return pool.getconn(max(0.05, wait))
            except PoolTimeout:
                if pool.exhausted:
                    if time.monotonic() - started >= patience:
                        raise TimeoutError(f"no free connection to PostgreSQL at {self.where} within {patience:g} "
                                           f"s: all {self.pool_size} {pool.purpose} are in use (memory.pool_size)"
                                           ) from None
                elif not probed:
                    probed = True  # unreachable: raises at once, with the server's reason ("Connection refused")
                    self._reach(max(2, math.ceil(self.timeout - self._first_wait)))
                else:
                    raise self._went_down(f"no connection within {self.timeout:g} s") from None

    def _failed(self, conn: Any, exc: BaseException, watch: "_Watch | None" = None) -> BaseException:
        """The exception to raise for `exc` on `conn`: an outage if the connection broke, else `exc` itself."""
        if not conn.broken:
            return exc
        return self._went_down(f"no answer within {watch.seconds:g} s" if watch and watch.cut else self._reason_of(exc))

    def _call(self, work: Callable[[Any], T]) -> T:
        import psycopg

        conn = self._getconn(self._pool, self.timeout)
        watch = None
        try:
            with self._watchdog.watching(conn, self.timeout + 1) as watch:  # the server's statement_timeout first
                return work(conn)
        except psycopg.Error as exc:
            failure = self._failed(conn, exc, watch)
            if failure is exc:
                raise
            raise failure from None
        finally:
            self._pool.putconn(conn)

    # ------------------------------------------------------------ the store

    @property
    def schema_version(self) -> int:
        return self._call(lambda conn: conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM chatforge_schema").fetchone()[0])

    def add(self, key: ConversationKey, *turns: Turn) -> None:
        if not turns:
            return
        self._refuse_if_unlocked(key)
        conversation, now = key.encode(), time.time()
        platform, key_user = _text(key.platform), None if key.user is None else _text(key.user)
        rows = [(conversation, platform, key_user, turn.role, _text(turn.text), _text(turn.user),
                 _text(turn.display_name), turn.created_at or now, json.dumps(turn.meta, default=str),
                 _text(turn.reply_to)) for turn in turns]

        def work(conn: Any) -> None:
            with conn.pipeline(), conn.transaction():  # one round trip
                # Without it, pairs written by several processes at once interleave (see shared/OFFLINE.md).
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (conversation, _ADD_SEED))
                with conn.cursor() as cursor:
                    cursor.executemany(_INSERT, rows)

        self._call(work)

    def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        rows = self._call(lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM chatforge_turns WHERE conversation = %s ORDER BY id DESC LIMIT %s",
            (key.encode(), limit)).fetchall())
        return [_turn(row) for row in reversed(rows)]

    def count(self, key: ConversationKey) -> int:
        return self._call(lambda conn: conn.execute(
            "SELECT COUNT(*) FROM chatforge_turns WHERE conversation = %s", (key.encode(),)).fetchone()[0])

    def conversations(self, platform: str | None = None) -> list[ConversationKey]:
        where = "" if platform is None else "WHERE platform = %s"
        rows = self._call(lambda conn: conn.execute(
            f"SELECT conversation FROM chatforge_turns {where} GROUP BY conversation ORDER BY MIN(id)",
            () if platform is None else (_text(platform),)).fetchall())
        return [ConversationKey.decode(row[0]) for row in rows]

    def forget(self, key: ConversationKey, user: str | None = None) -> int:
        if user is None:
            return self._call(lambda conn: conn.execute(
                "DELETE FROM chatforge_turns WHERE conversation = %s", (key.encode(),)).rowcount)
        return self._call(lambda conn: conn.execute(
            f"DELETE FROM chatforge_turns WHERE conversation = %s AND {_OWNER} = %s", (key.encode(), user)).rowcount)

    def about_user(self, platform: str, user: str) -> list[tuple[ConversationKey, Turn]]:
        rows = self._call(lambda conn: conn.execute(
            f"SELECT conversation, {_COLUMNS} FROM chatforge_turns WHERE {_ABOUT_USER} ORDER BY id",
            {"platform": platform, "user": user}).fetchall())
        return [(ConversationKey.decode(row[0]), _turn(row[1:])) for row in rows]

    def forget_user(self, platform: str, user: str) -> int:
        return self._call(lambda conn: conn.execute(
            f"DELETE FROM chatforge_turns WHERE {_ABOUT_USER}", {"platform": platform, "user": user}).rowcount)

    def purge_before(self, timestamp: float) -> int:
        """In batches, each well within the statement timeout, however much a first retention period removes."""
        removed, batch = 0, 5000
        while True:
            deleted = self._call(lambda conn: conn.execute(
                "DELETE FROM chatforge_turns WHERE id IN (SELECT id FROM chatforge_turns WHERE created_at < %s"
                " LIMIT %s)", (timestamp, batch)).rowcount)
            removed += deleted
            if deleted < batch:
                return removed

    def claim(self, event: str) -> bool:
        now = time.time()

        def work(conn: Any) -> bool:
            if now - self._claims_pruned_at > 3600:
                conn.execute("DELETE FROM chatforge_claims WHERE claimed_at < %s", (now - CLAIMS_KEPT_FOR,))
                self._claims_pruned_at = now
            return conn.execute("INSERT INTO chatforge_claims (event, claimed_at) VALUES (%s, %s)"
                                " ON CONFLICT (event) DO NOTHING", (_text(event), now)).rowcount == 1

        return self._call(work)

    def lock(self, key: ConversationKey) -> ContextManager[None]:
        return _ConversationLock(self, key)

    def _refuse_if_unlocked(self, key: ConversationKey) -> None:
        """Refuse the turn of a conversation answered without its lock: order across processes comes first."""
        with self._locks:
            unlocked = key in self._unlocked
            self._unlocked.discard(key)
            held = self._held.get(key)
        if unlocked:
            raise UnlockedTurn(f"not stored: the conversation {key} could not be locked while it was answered, "
                               "so another process may have answered it meanwhile")
        if held is not None and _has_news(held):
            raise UnlockedTurn(f"not stored: the lock on the conversation {key} was lost while it was answered "
                               "(its connection broke), so another process may have answered it meanwhile")

    def _locked(self, key: ConversationKey, conn: Any) -> None:
        with self._locks:
            if conn is None:
                self._held.pop(key, None)
                self._unlocked.add(key)
            else:
                self._held[key] = conn
                self._unlocked.discard(key)

    def _unlocking(self, key: ConversationKey) -> None:
        with self._locks:
            self._held.pop(key, None)

    def _take_lock(self, key: ConversationKey) -> Any:
        """A connection of the lock pool holding the conversation's session lock."""
        import psycopg

        # Each conversation being answered holds one of pool_size connections: beyond that, a conversation waits
        # for one as it would for its lock.
        conn = self._getconn(self._lock_pool, self.lock_timeout)
        watch = None
        try:
            with self._watchdog.watching(conn, self.lock_timeout + self.timeout + 1) as watch:
                conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, %s))", (key.encode(), _LOCK_SEED))
        except psycopg.errors.LockNotAvailable:
            self._lock_pool.putconn(conn)
            raise LockTimeout(f"the conversation {key} stayed locked by another process for over "
                              f"{self.lock_timeout:g} s") from None
        except psycopg.Error as exc:
            failure = self._failed(conn, exc, watch)
            self._lock_pool.putconn(conn)
            if failure is exc:
                raise
            raise failure from None
        except BaseException:
            self._lock_pool.putconn(conn)  # a broken connection is discarded by the pool; its lock went with it
            raise
        return conn

    def _release_lock(self, conn: Any, key: ConversationKey) -> None:
        import psycopg

        if _has_news(conn):  # the connection is gone (a restart), and its lock with it: nothing to unlock
            with contextlib.suppress(Exception):
                conn.close()
            self._lock_pool.putconn(conn)
            return
        watch = None
        try:
            with self._watchdog.watching(conn, self.timeout + 1) as watch:
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, %s))", (key.encode(), _LOCK_SEED))
        except psycopg.Error as exc:
            failure = self._failed(conn, exc, watch)  # a broken connection took its lock with it
            if failure is exc:
                raise
            raise failure from None
        finally:
            self._lock_pool.putconn(conn)

    def close(self) -> None:
        self._closed.set()
        self._watchdog.cut_all()  # a call still waiting (a lock another process holds) ends now, not in 120 s
        try:
            prober = self._prober
            if prober is not None:
                prober.join(self._connect_seconds + 2)
            for pool in (self._lock_pool, self._pool):
                pool.close()
        finally:
            self._watchdog.stop()


class _Watch:
    def __init__(self, conn: Any, seconds: float) -> None:
        self.conn, self.seconds = conn, seconds
        self.deadline = time.monotonic() + seconds
        self.cut = False


class _Watchdog:
    """Cuts the connection of a call that the server never answers: statement_timeout is the server's own
    (a hung server never applies it) and TCP may wait for ever. The socket is shut down, so the call fails
    at once, and the pool drops the connection."""

    TICK = 0.25

    def __init__(self) -> None:
        self._watches: set[_Watch] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, conn: Any, seconds: float) -> Iterator[_Watch]:
        watch = _Watch(conn, seconds)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(target=self._run, name="chatforge-postgres-watchdog", daemon=True)
                self._thread.start()
        try:
            yield watch
        finally:
            with self._lock:  # once out of the set, the connection is never cut (it goes back to the pool)
                self._watches.discard(watch)

    def _run(self) -> None:
        while not self._stopped.wait(self.TICK):
            self._cut_due()

    def cut_all(self) -> None:
        """Cut every watched call's connection at once (the store is closing)."""
        with self._lock:
            for watch in self._watches:
                watch.deadline = 0.0
        self._cut_due()

    def _cut_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            for watch in [watch for watch in self._watches if watch.deadline <= now and not watch.cut]:
                watch.cut = True
                with contextlib.suppress(Exception):  # closed meanwhile: nothing to cut
                    duplicate = socket.socket(fileno=os.dup(watch.conn.fileno()))
                    try:
                        duplicate.shutdown(socket.SHUT_RDWR)
                    finally:
                        duplicate.close()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(5)


class _Pool:
    """A psycopg pool, and how many of its connections this store has out: all of them out is a wait, not an
    outage (the pool's own count also holds connections it is still trying to make)."""

    def __init__(self, purpose: str) -> None:
        self.pool: Any = None
        self.purpose = purpose
        self._out = 0
        self._lock = threading.Lock()
        self._sweeping = threading.Lock()

    def check_idle(self, conn: Any) -> None:
        """The pool's check of a connection it is about to hand out, without a round trip unless it has news.
        A dead one means the server restarted: the other idle ones are dead too, and are dropped at once
        (else the pool would pause a second before each next one)."""
        from psycopg_pool import ConnectionPool

        if not _has_news(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            if self._sweeping.acquire(blocking=False):
                try:
                    self.pool.check()
                finally:
                    self._sweeping.release()
            raise

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._out >= (self.pool.max_size or 1)

    def getconn(self, timeout: float) -> Any:
        conn = self.pool.getconn(timeout=timeout)
        with self._lock:
            self._out += 1
        return conn

    def putconn(self, conn: Any) -> None:
        with self._lock:
            self._out -= 1
        self.pool.putconn(conn)

    def check(self) -> None:
        self.pool.check()

    def close(self) -> None:
        self.pool.close(timeout=5)


class _ConversationLock:
    """`PostgresMemory.lock(key)`: entered and left on whichever of the engine's threads."""

    def __init__(self, store: PostgresMemory, key: ConversationKey) -> None:
        self._store, self._key = store, key
        self._conn: Any = None

    def __enter__(self) -> None:
        try:
            self._conn = self._store._take_lock(self._key)
        except BaseException:
            self._store._locked(self._key, None)
            raise
        self._store._locked(self._key, self._conn)

    def __exit__(self, *exc_info: Any) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._store._unlocking(self._key)
            self._store._release_lock(conn, self._key)


# ------------------------------------------------------------------ the backend

class PostgresConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: SecretStr
    """postgresql://user:password@host:5432/database; write ${DATABASE_URL} to keep the password out of the file."""
    pool_size: Annotated[int, Field(ge=1)] = 10
    """Connections at most for reads and writes; as many again for the conversations being answered (locks)."""
    timeout: Annotated[float, Field(gt=0)] = 5.0
    """Seconds a call may wait for a connection or a statement before the turn is given up."""

    @field_validator("url")
    @classmethod
    def _redact_the_password(cls, url: SecretStr) -> SecretStr:
        """The URL is a secret as a whole (PluginHost registers it); its password alone is one too."""
        redaction.REDACTOR.add(_passwords(url.get_secret_value()))
        return url


class PostgresBackend(MemoryBackend):
    """`memory.backend: postgres`: one database shared by every process of the bot, on any machine."""

    name = "postgres"
    Config = PostgresConfig

    @classmethod
    def create(cls, config: PostgresConfig, settings: Any) -> MemoryStore:
        return PostgresMemory(config.url.get_secret_value(), pool_size=config.pool_size, timeout=config.timeout)

    @classmethod
    def describe(cls, config: PostgresConfig, settings: Any) -> str:
        url = config.url.get_secret_value()
        shown = mask_url(url)
        for secret in sorted(_passwords(url), key=len, reverse=True):
            if len(secret) >= 3:
                shown = shown.replace(secret, redaction.MASK)
        return f"postgres ({shown})"


@hookimpl
def chatforge_register_memory_backends(register) -> None:
    register(PostgresBackend)
