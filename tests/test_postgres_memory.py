"""`memory.backend: postgres` against a throwaway PostgreSQL server (tests/postgres.py, fixtures in conftest.py).

The store passes the conformance suite; its schema is migrated once however many processes start at once;
its conversation lock is exclusive across processes and dies with the one holding it; a database that is
down at start, or restarted under a running bot, costs turns but never replies; the password is never shown.
The last tests drive the real `chatforge chat` on a fake model server (tests/fake_openai.py).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chatforge.conversation import ConversationKey
from chatforge.memory import MemoryUnavailable, Turn
from chatforge.memory_contract import ANN, BOB, GROUP, texts, turn
from chatforge.postgres_memory import (MIGRATIONS, RETRY_AFTER, DatabaseUnreachable, LockTimeout, PostgresBackend,
                                       PostgresMemory, UnlockedTurn, mask_url)
from chatforge.testing import MemoryStoreContract

from postgres import PostgresServer

CHATFORGE = str(Path(sys.executable).parent / "chatforge")


class TestPostgresMemory(MemoryStoreContract):
    @pytest.fixture
    def store(self, postgres_url):
        store = PostgresMemory(postgres_url)
        yield store
        store.close()

    @pytest.fixture
    def second_store(self, store, postgres_url):
        second = PostgresMemory(postgres_url)  # as a second process on the same database would have it
        yield second
        second.close()


def test_text_with_a_nul_character_is_kept_and_meta_round_trips_exactly(postgres_url):
    store = PostgresMemory(postgres_url)
    try:
        store.add(ANN, Turn("user", "before\x00after", 1.0, "ann", "A\x00nn", meta={"raw": "a\x00b", "n": [1, 2.5]}))
        [back] = store.recent(ANN, 1)
        assert back.text == "before\ufffdafter" and back.display_name == "A\ufffdnn"  # PostgreSQL text holds no NUL
        assert back.meta == {"raw": "a\x00b", "n": [1, 2.5]}
    finally:
        store.close()


# ------------------------------------------------------------------ migrations

def schema_rows(url: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute("SELECT version, applied_at FROM chatforge_schema ORDER BY version").fetchall()


def test_a_fresh_database_is_migrated_and_its_version_recorded(postgres_url):
    store = PostgresMemory(postgres_url)
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert [version for version, _ in schema_rows(postgres_url)] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        store.close()


def test_a_second_start_changes_nothing(postgres_url):
    first = PostgresMemory(postgres_url)
    first.add(ANN, turn("kept"))
    first.close()
    before = schema_rows(postgres_url)
    second = PostgresMemory(postgres_url)
    try:
        assert schema_rows(postgres_url) == before  # no migration applied again
        assert texts(second.recent(ANN, 5)) == ["kept"]
    finally:
        second.close()


def test_stores_opening_at_once_on_a_fresh_database_all_work(postgres_url):
    count = 4
    barrier = threading.Barrier(count)
    stores: list[PostgresMemory] = []
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            store = PostgresMemory(postgres_url)
            stores.append(store)
            store.add(ConversationKey("p", f"chat-{index}"), turn(f"from {index}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not errors and len(stores) == count
        assert [version for version, _ in schema_rows(postgres_url)] == list(range(1, len(MIGRATIONS) + 1))
        for store in stores:
            assert [texts(store.recent(ConversationKey("p", f"chat-{index}"), 5)) for index in range(count)] == \
                [[f"from {index}"] for index in range(count)]
    finally:
        for store in stores:
            store.close()


def test_a_database_of_a_newer_chatforge_is_refused(postgres, postgres_url):
    PostgresMemory(postgres_url).close()
    postgres.execute(f"INSERT INTO chatforge_schema VALUES ({len(MIGRATIONS) + 1}, 0)", database=postgres_url.rsplit("/", 1)[1])
    with pytest.raises(MemoryUnavailable) as raised:
        PostgresMemory(postgres_url)
    assert raised.value.key == "url"
    assert f"was written by a newer chatforge (schema {len(MIGRATIONS) + 1} > {len(MIGRATIONS)})" in str(raised.value)
    assert postgres.password not in str(raised.value)


# ------------------------------------------------------------------ the conversation lock

def test_the_conversation_lock_is_exclusive_across_stores(postgres_url):
    first, second = PostgresMemory(postgres_url), PostgresMemory(postgres_url)
    order: list[str] = []
    entered = threading.Event()

    def take() -> None:
        with second.lock(ANN):
            order.append("second")
            entered.set()

    thread = threading.Thread(target=take)
    try:
        with first.lock(ANN):
            thread.start()
            assert not entered.wait(1.0)  # the first store holds it
            with second.lock(BOB):  # another conversation is not held up
                pass
            order.append("first")
        assert entered.wait(10), "the second store never got the lock once it was released"
        thread.join(10)
        assert order == ["first", "second"]
    finally:
        thread.join(10)
        first.close()
        second.close()


def test_a_wait_for_the_lock_is_bounded_and_leaves_the_store_working(postgres_url):
    first, second = PostgresMemory(postgres_url), PostgresMemory(postgres_url, lock_timeout=1)
    try:
        with first.lock(ANN):
            started = time.monotonic()
            with pytest.raises(LockTimeout, match="stayed locked by another process"):
                with second.lock(ANN):
                    pass
            assert 0.8 < time.monotonic() - started < 5
            with pytest.raises(UnlockedTurn):  # answered without the lock: not stored
                second.add(ANN, turn("answered without the lock"))
            second.add(BOB, turn("not down for all that"))  # a lock wait is no outage: no fail-fast window
        with second.lock(ANN):
            second.add(ANN, turn("under the lock"))
        assert texts(second.recent(ANN, 5)) == ["under the lock"]
        assert texts(second.recent(BOB, 5)) == ["not down for all that"]
    finally:
        first.close()
        second.close()


def test_closing_a_store_ends_a_lock_wait_in_progress(postgres_url):
    """A process stopping while one of its conversations waits for another process's lock must not wait out
    the lock timeout (120 s): a supervisor would kill it first."""
    first, second = PostgresMemory(postgres_url), PostgresMemory(postgres_url)
    outcome: list[BaseException | None] = []

    def wait_for_it() -> None:
        try:
            with second.lock(ANN):
                outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the wait ended with
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_it)
    try:
        with first.lock(ANN):
            thread.start()
            time.sleep(0.5)  # the second store is waiting in pg_advisory_lock now
            started = time.monotonic()
            second.close()
            thread.join(10)
            assert not thread.is_alive() and time.monotonic() - started < 8, "close() left the lock wait running"
        assert outcome and outcome[0] is not None, "the wait ended as if the lock had been taken"
    finally:
        thread.join(10)
        first.close()


def test_lock_holders_never_starve_reads_and_writes(postgres_url):
    store = PostgresMemory(postgres_url, pool_size=1, timeout=2)
    try:
        with store.lock(ANN):
            started = time.monotonic()
            store.add(BOB, turn("while ann's conversation is locked"))
            assert texts(store.recent(BOB, 5)) == ["while ann's conversation is locked"]
            assert store.claim("p:1") and store.count(ANN) == 0
            assert time.monotonic() - started < 1.5
    finally:
        store.close()


def test_beyond_pool_size_conversations_wait_for_a_lock_connection_and_it_is_no_outage(postgres_url, caplog):
    store = PostgresMemory(postgres_url, pool_size=1, timeout=0.5)
    entered = threading.Event()
    errors: list[BaseException] = []

    def answer_bob() -> None:
        try:
            with store.lock(BOB):
                entered.set()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=answer_bob)
    try:
        with store.lock(ANN):  # the one connection for locks
            thread.start()
            assert not entered.wait(1.5) and not errors  # waits past `timeout`, as for a lock
            store.add(ANN, turn("reads and writes go on"))
        assert entered.wait(10) and not errors
        assert not memory_lines(caplog) and store.count(ANN) == 1
    finally:
        thread.join(10)
        store.close()


HOLD_THE_LOCK = """
import sys, time
from chatforge.memory_contract import ANN
from chatforge.postgres_memory import PostgresMemory
store = PostgresMemory(sys.argv[1])
with store.lock(ANN):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_lock_dies_with_the_process_that_held_it(postgres_url):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, postgres_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    second = PostgresMemory(postgres_url, lock_timeout=1)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(holder.stdout.readline()), daemon=True).start()
        assert lines.get(timeout=30).strip() == "locked", holder.stderr.read() if holder.poll() is not None else ""
        with pytest.raises(LockTimeout, match="stayed locked by another process"):
            with second.lock(ANN):
                pass
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 10
        while True:  # PostgreSQL sees the connection close at once on loopback
            try:
                with second.lock(ANN):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        second.close()


# ------------------------------------------------------------------ a database that is down

@pytest.fixture
def own_postgres(postgres):
    """A server of the test's own, not started (`postgres` first: skipped where PostgreSQL is missing)."""
    server = PostgresServer()
    yield server
    server.stop()


def memory_lines(caplog) -> list[str]:
    """The store's warnings (INFO lines, such as the migrations applied, aside)."""
    return [record.getMessage() for record in caplog.records
            if record.name == "chatforge.memory" and record.levelno >= logging.WARNING]


def wait_until_stored(store: PostgresMemory, key: ConversationKey, text: str, within: float) -> float:
    """Add a turn until the store takes it (bounded); the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            store.add(key, turn(text))
            return time.monotonic() - started
        except DatabaseUnreachable:
            if time.monotonic() - started > within:
                raise
            time.sleep(0.1)


def test_a_database_down_at_start_is_one_warning_and_turns_are_stored_once_it_is_up(own_postgres, caplog):
    caplog.set_level(logging.INFO, "chatforge.memory")
    started = time.monotonic()
    store = PostgresMemory(own_postgres.url, timeout=1)
    try:
        assert time.monotonic() - started < 3
        assert memory_lines(caplog) == [
            f"memory.url: cannot reach PostgreSQL at 127.0.0.1:{own_postgres.port} (Connection refused); "
            "replies are sent, turns are lost until it returns"]
        for call in (lambda: store.add(ANN, turn("lost")), lambda: store.recent(ANN, 5), lambda: store.claim("p:1"),
                     lambda: store.lock(GROUP).__enter__()):
            started = time.monotonic()
            with pytest.raises(DatabaseUnreachable, match=f"PostgreSQL at 127.0.0.1:{own_postgres.port}"):
                call()
            assert time.monotonic() - started < 0.5
        own_postgres.start()
        wait_until_stored(store, ANN, "kept", within=RETRY_AFTER + 10)
        assert texts(store.recent(ANN, 5)) == ["kept"]
        assert store.schema_version == len(MIGRATIONS)  # migrated on the first connection
        with store.lock(ANN):
            pass
        lines = memory_lines(caplog)
        assert len(lines) == 2 and lines[1] == f"memory: PostgreSQL at 127.0.0.1:{own_postgres.port} is back; turns are stored again"
        assert own_postgres.password not in caplog.text
    finally:
        store.close()


def test_a_database_restarted_under_a_store_fails_fast_then_recovers(own_postgres, caplog):
    own_postgres.start()
    caplog.set_level(logging.INFO, "chatforge.memory")
    store = PostgresMemory(own_postgres.url, timeout=1)
    try:
        store.add(ANN, turn("before"))
        with store.lock(GROUP):
            pass
        own_postgres.stop_server()
        started = time.monotonic()
        with pytest.raises(DatabaseUnreachable, match=r"\(Connection refused\)"):  # the server's reason
            store.add(ANN, turn("during"))
        assert time.monotonic() - started < 1 + 0.5  # within `timeout`
        # the next calls fail at once instead of each waiting for the timeout again
        for call in (lambda: store.recent(ANN, 5), lambda: store.count(ANN), lambda: store.claim("p:2"),
                     lambda: store.forget(ANN), lambda: store.lock(GROUP).__enter__()):
            started = time.monotonic()
            with pytest.raises(DatabaseUnreachable):
                call()
            assert time.monotonic() - started < 0.2
        time.sleep(RETRY_AFTER + 0.2)  # after the pause, a call tries again (and the server still refuses)
        started = time.monotonic()
        with pytest.raises(DatabaseUnreachable, match="Connection refused"):
            store.count(ANN)
        assert time.monotonic() - started < 1.5
        own_postgres.start()
        wait_until_stored(store, ANN, "after", within=RETRY_AFTER + 10)
        assert texts(store.recent(ANN, 5)) == ["before", "after"]
        with store.lock(ANN):  # the lock's pool reconnected too
            assert store.claim("p:3")
        lost, back = memory_lines(caplog)  # one line as it went, one as it came back
        assert lost.startswith(f"memory: lost PostgreSQL at 127.0.0.1:{own_postgres.port} (")
        assert lost.endswith("); replies are sent, turns are lost until it returns")
        assert back == f"memory: PostgreSQL at 127.0.0.1:{own_postgres.port} is back; turns are stored again"
    finally:
        store.close()


def test_a_server_that_stops_answering_costs_a_call_its_timeout_then_calls_fail_fast(own_postgres):
    own_postgres.start()
    store = PostgresMemory(own_postgres.url, timeout=1)
    try:
        store.add(ANN, turn("before"))
        own_postgres.pause()  # it still accepts connections, and never answers
        started = time.monotonic()
        with pytest.raises(DatabaseUnreachable, match="no answer within 2 s"):
            store.recent(ANN, 5)
        assert time.monotonic() - started < 1 + 1 + 1.5
        started = time.monotonic()
        with pytest.raises(DatabaseUnreachable):
            store.add(ANN, turn("lost"))
        assert time.monotonic() - started < 0.2
        own_postgres.resume()
        wait_until_stored(store, ANN, "after", within=RETRY_AFTER + 10)
        assert texts(store.recent(ANN, 5)) == ["before", "after"]
    finally:
        own_postgres.resume()
        store.close()


def wait_until_up(store: PostgresMemory, within: float) -> None:
    started = time.monotonic()
    while True:
        try:
            store.count(GROUP)
            return
        except DatabaseUnreachable:
            if time.monotonic() - started > within:
                raise
            time.sleep(0.1)


def test_a_turn_answered_without_its_lock_is_not_stored(own_postgres):
    """Another process may have answered the conversation meanwhile: its order comes before one more turn."""
    store = PostgresMemory(own_postgres.url, timeout=1)  # down at start
    try:
        with pytest.raises(DatabaseUnreachable):
            store.lock(ANN).__enter__()  # the engine then answers without the lock...
        own_postgres.start()
        wait_until_up(store, within=RETRY_AFTER + 10)
        with pytest.raises(UnlockedTurn, match="could not be locked while it was answered"):
            store.add(ANN, turn("answered without the lock"))  # ...and its turn is not stored
        with store.lock(ANN):
            store.add(ANN, turn("under the lock"))
        store.add(BOB, turn("a store used without locks"))
        assert texts(store.recent(ANN, 5)) == ["under the lock"] and store.count(BOB) == 1
    finally:
        store.close()


def test_a_turn_whose_lock_went_with_a_restart_is_not_stored(own_postgres):
    own_postgres.start()
    store = PostgresMemory(own_postgres.url, timeout=1)
    try:
        held = store.lock(ANN)
        held.__enter__()
        own_postgres.restart()  # the session lock is gone: another process may take the conversation
        wait_until_up(store, within=RETRY_AFTER + 10)
        with pytest.raises(UnlockedTurn, match="was lost while it was answered"):
            store.add(ANN, turn("answered under a lost lock"))
        held.__exit__(None, None, None)  # nothing to unlock, and no outage either
        store.add(BOB, turn("on at once"))
        with store.lock(ANN):
            store.add(ANN, turn("under a new lock"))
        assert texts(store.recent(ANN, 5)) == ["under a new lock"]
    finally:
        store.close()


def test_a_quick_restart_between_calls_loses_nothing_and_costs_no_pause(own_postgres):
    own_postgres.start()
    store = PostgresMemory(own_postgres.url, timeout=5)
    try:
        store.add(ANN, turn("before"))
        with store.lock(ANN), store.lock(BOB):
            pass
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=lambda: (barrier.wait(10), store.count(ANN), time.sleep(0.2)))
                   for _ in range(4)]
        for thread in threads:  # several pooled connections, all idle once these are done
            thread.start()
        for thread in threads:
            thread.join(20)
        own_postgres.restart()  # every pooled connection is dead; the pool replaces them
        started = time.monotonic()
        store.add(ANN, turn("after"))
        with store.lock(ANN):
            assert texts(store.recent(ANN, 5)) == ["before", "after"]
        assert time.monotonic() - started < 2.5  # no pause per dead connection (~1 s each), nor `timeout` (5 s)
    finally:
        store.close()


# ------------------------------------------------------------------ URLs and passwords

def test_the_password_is_masked_in_shown_urls():
    assert mask_url("postgresql://chat:s3cret@127.0.0.1:5432/chatforge") == "postgresql://chat:***@127.0.0.1:5432/chatforge"
    assert mask_url("postgresql://chat@db/chatforge?password=s3cret&sslmode=require") == \
        "postgresql://chat@db/chatforge?password=***&sslmode=require"
    assert mask_url("postgres://db.example/chatforge") == "postgres://db.example/chatforge"


@pytest.mark.parametrize("url, problem", [
    ("mysql://chat:s3cret-pw@127.0.0.1/chatforge", "must be a postgresql:// URL"),
    ("postgresql://chat:s3cret-pw@[::1/chatforge", "cannot be parsed"),
    ("postgresql://chat:s3cret-pw@127.0.0.1:5432/chatforge?bogus=1", "cannot be parsed"),
    ("postgresql://chat:s3cret-pw@127.0.0.1:notaport/chatforge", 'invalid integer value "notaport"'),
])
def test_a_wrong_url_is_refused_in_one_line_without_its_password(url, problem):
    with pytest.raises(MemoryUnavailable) as raised:
        PostgresMemory(url)
    message = str(raised.value)
    assert raised.value.key == "url" and message.startswith("memory.url: ") and problem in message
    assert "s3cret-pw" not in message and "\n" not in message


def test_a_refused_login_or_a_missing_database_is_refused_at_start(postgres):
    with pytest.raises(MemoryUnavailable) as raised:
        PostgresMemory(postgres.url_for("postgres", password="wrong-password"))
    assert str(raised.value) == (f"memory.url: PostgreSQL at 127.0.0.1:{postgres.port} refused the login "
                                 '(password authentication failed for user "postgres")')
    with pytest.raises(MemoryUnavailable, match='database "no_such_db" does not exist'):
        PostgresMemory(postgres.url_for("no_such_db"))


def test_describe_and_config(postgres):
    config = PostgresBackend.Config(url=postgres.url)
    assert (config.pool_size, config.timeout) == (10, 5.0)
    assert PostgresBackend.describe(config, None) == \
        f"postgres (postgresql://postgres:***@127.0.0.1:{postgres.port}/postgres)"
    with pytest.raises(ValueError):
        PostgresBackend.Config(url=postgres.url, pool_size=0)
    with pytest.raises(ValueError):
        PostgresBackend.Config(url=postgres.url, host="x")
    with pytest.raises(ValueError):
        PostgresBackend.Config()


# ------------------------------------------------------------------ the real CLI

def chat_config(folder: Path, base_url: str, extra: str = "") -> Path:
    config = folder / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        generator:
          backend: openai
          base_url: {base_url}
          model: smollm2
          timeout: 5
          max_retries: 0
        memory:
          backend: postgres
          url: ${{DATABASE_URL}}
          timeout: 2
        """) + textwrap.dedent(extra))
    return config


class Chat:
    """`chatforge chat --json` kept running: one line in, one JSON reply out, every wait bounded."""

    def __init__(self, config: Path, env: dict[str, str], folder: Path) -> None:
        self.stderr_path = folder / f"stderr-{time.monotonic_ns()}.txt"
        self._stderr = self.stderr_path.open("w")
        self.process = subprocess.Popen([CHATFORGE, "chat", "--json", "--user", "ann", "-c", str(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                        text=True, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)

    def ask(self, text: str, timeout: float = 30) -> str:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        try:
            return json.loads(self._lines.get(timeout=timeout))["reply"]
        except queue.Empty:
            raise AssertionError(f"no reply to {text!r} within {timeout} s; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text()

    def close(self) -> int:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError("chatforge chat did not exit within 30 s of its input ending") from None
        finally:
            self._stderr.close()


@pytest.fixture
def model_server():
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as server:
        yield server


def test_chat_remembers_across_a_restart_and_processes_share_history_and_forget(cli, tmp_path, postgres,
                                                                                postgres_url, model_server):
    config = chat_config(tmp_path, model_server.base_url)
    env = {"DATABASE_URL": postgres_url, "HOME": str(tmp_path)}
    first = cli("chat", "--user", "ann", "-c", str(config), stdin="my name is Ann\n", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "You said: my name is Ann" in first.stdout

    # a restart remembers: the model is given what the first run stored
    again = cli("chat", "--user", "ann", "-c", str(config), stdin="what is my name?\n/history\n", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    asked = [request for request in model_server.chat_requests()
             if request.messages and request.messages[-1]["content"] == "what is my name?"]
    assert [message["content"] for message in asked[-1].messages if message["role"] != "system"] == [
        "my name is Ann", "You said: my name is Ann", "what is my name?"]
    assert ("I remember 4 turns of this conversation:\nYou: my name is Ann\nchatforge: You said: my name is Ann\n"
            "You: what is my name?\nchatforge: You said: what is my name?") in again.stdout

    # two processes at once: what one stores the other shows, and /forget in one removes it for both
    running = Chat(config, env, tmp_path)
    try:
        assert running.ask("hello from the running one") == "You said: hello from the running one"
        other = cli("chat", "--user", "ann", "-c", str(config), stdin="/history\n", env=env, cwd=tmp_path)
        assert "You: hello from the running one" in other.stdout and "You: my name is Ann" in other.stdout
        forgot = cli("chat", "--user", "ann", "-c", str(config), stdin="/forget\n", env=env, cwd=tmp_path)
        assert "Done: I deleted everything I kept about you on console (6 turns)." in forgot.stdout, forgot.stderr
        assert running.ask("/history") == "I don't remember anything of this conversation yet."
        assert running.close() == 0
        assert "Traceback" not in running.stderr() and postgres.password not in running.stderr()
    finally:
        if running.process.poll() is None:
            running.close()
    assert postgres.password not in first.stderr + again.stderr + other.stderr + forgot.stderr


def test_chat_with_the_database_down_answers_logs_one_line_and_stores_once_it_is_up(tmp_path, own_postgres,
                                                                                    model_server):
    config = chat_config(tmp_path, model_server.base_url)
    port = own_postgres.port
    running = Chat(config, {"DATABASE_URL": own_postgres.url, "HOME": str(tmp_path)}, tmp_path)
    try:
        started = time.monotonic()
        assert running.ask("hello while it is down") == "You said: hello while it is down"
        assert running.ask("and again") == "You said: and again"
        assert time.monotonic() - started < 10  # no call waits the full timeout over and over
        own_postgres.start()
        time.sleep(RETRY_AFTER + 0.5)  # past the pause after a failure: the next call reaches the server
        assert running.ask("stored now") == "You said: stored now"
        shown = running.ask("/history")
        assert "You: stored now" in shown and "while it is down" not in shown
        assert running.close() == 0
        stderr = running.stderr()
    finally:
        if running.process.poll() is None:
            running.close()
    assert [line for line in stderr.splitlines() if "cannot reach PostgreSQL" in line] == [
        f"chatforge.memory: WARNING: memory.url: cannot reach PostgreSQL at 127.0.0.1:{port} (Connection refused); "
        "replies are sent, turns are lost until it returns"]
    assert f"memory: PostgreSQL at 127.0.0.1:{port} is back; turns are stored again" in stderr
    assert own_postgres.password not in stderr and "Traceback" not in stderr


def test_the_password_never_appears_in_output(cli, tmp_path, postgres, postgres_url, model_server):
    config = chat_config(tmp_path, model_server.base_url)
    env = {"DATABASE_URL": postgres_url, "HOME": str(tmp_path)}
    verbose = cli("chat", "-vv", "-c", str(config), stdin="hello\n/history\n", env=env, cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    database = postgres_url.rsplit("/", 1)[1]
    assert f"memory: postgres (postgresql://postgres:***@127.0.0.1:{postgres.port}/{database})" in verbose.stderr
    listed = cli("plugins", "-c", str(config), env=env, cwd=tmp_path)
    # written in the file rather than taken from the environment, and wrong: refused, still masked
    literal = tmp_path / "literal"
    literal.mkdir()
    wrong = chat_config(literal, model_server.base_url).read_text().replace(
        "${DATABASE_URL}", postgres.url_for(database, password=postgres.password + "-wrong"))
    (literal / "config.yaml").write_text(wrong)
    refused = cli("chat", "-c", str(literal / "config.yaml"), stdin="hello\n", cwd=literal, env={"HOME": str(tmp_path)})
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"chatforge: memory.url: PostgreSQL at 127.0.0.1:{postgres.port} refused the "
                                      'login (password authentication failed for user "postgres")')
    fine = cli("config", "check", "-c", str(config), env=env, cwd=tmp_path)
    assert fine.returncode == 0, fine.stderr
    config.write_text(config.read_text() + "  pool_size: 0\n")
    checked = cli("config", "check", "-c", str(config), env=env, cwd=tmp_path)
    assert checked.returncode == 2 and "memory.pool_size: " in checked.stderr
    for result in (verbose, listed, refused, fine, checked):
        assert postgres.password not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
