"""Tests for chatforge.memory: both backends behave the same; SQLite specifics; keys."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from chatforge.conversation import ConversationKey
from chatforge.memory import InMemoryMemory, Turn, conversation_key
from chatforge.sqlite_memory import MIGRATIONS, SQLiteMemory
from chatforge.testing import MemoryStoreContract
from chatforge.message import Message


class TestInMemoryMemory(MemoryStoreContract):
    @pytest.fixture
    def store(self):
        store = InMemoryMemory()
        yield store
        store.close()

    @pytest.fixture
    def second_store(self, store):
        return store  # in-process: the only handle there is


class TestSQLiteMemory(MemoryStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        store = SQLiteMemory(tmp_path / "memory.sqlite3")
        yield store
        store.close()

    @pytest.fixture
    def second_store(self, store, tmp_path):
        second = SQLiteMemory(tmp_path / "memory.sqlite3")  # as a second process on the same file
        yield second
        second.close()


K = ConversationKey("test", "chat", None, "u")


def turn(text: str, role: str = "user", at: float = 1000.0, **extra) -> Turn:
    return Turn(role=role, text=text, created_at=at, **extra)


# ------------------------------------------------------------------ conversation_key

def test_key_scope_user_separates_people_in_a_chat():
    alice = Message(text="hi", platform="telegram", chat="group-1", user="alice")
    bob = alice.replace(user="bob")
    assert conversation_key(alice, "user") != conversation_key(bob, "user")
    assert conversation_key(alice) == conversation_key(alice, "user")  # user is the default


def test_key_scope_chat_shares_one_memory():
    alice = Message(text="hi", platform="telegram", chat="group-1", user="alice")
    bob = alice.replace(user="bob", text="other text", display_name="Bob")
    assert conversation_key(alice, "chat") == conversation_key(bob, "chat")
    assert conversation_key(alice, "chat") != conversation_key(alice, "user")


def test_key_is_stable_and_ignores_message_text():
    first = Message(text="one", platform="discord", chat="c", user="u", thread="t")
    second = first.replace(text="two", display_name="someone", mentioned=True, direct=False)
    assert conversation_key(first) == conversation_key(second)


def test_key_separates_platforms_chats_and_threads():
    base = Message(text="x", platform="discord", chat="c1", user="u", thread=None)
    keys = {
        conversation_key(base),
        conversation_key(base.replace(platform="telegram")),
        conversation_key(base.replace(chat="c2")),
        conversation_key(base.replace(thread="t1")),
        conversation_key(base.replace(thread="t2")),
        conversation_key(base.replace(thread="None")),  # a thread literally named "None"
        conversation_key(base.replace(thread="")),
    }
    assert len(keys) == 7


def test_key_threads_separate_in_chat_scope_too():
    base = Message(text="x", platform="discord", chat="c1", user="u")
    assert conversation_key(base.replace(thread="a"), "chat") != conversation_key(base.replace(thread="b"), "chat")


@pytest.mark.parametrize(
    "first, second",
    [
        # (chat, user, thread) pairs that would collide with a naive "a:b:c" join.
        (("a:b", "c", None), ("a", "b:c", None)),
        (("a", "b", "c:d"), ("a", "b:c", "d")),
        (('a"', "b", None), ("a", '"b', None)),
        (('a","b', "c", None), ("a", 'b","c', None)),
        (("a\\", "b", None), ("a", "\\b", None)),
        (("a,", "b", None), ("a", ",b", None)),
        (("a]", "b", None), ("a", "]b", None)),
    ],
)
def test_keys_cannot_collide_through_separators(first, second):
    def key(chat, user, thread):
        return conversation_key(Message(text="x", platform="p", chat=chat, user=user, thread=thread))

    assert key(*first) != key(*second)
    assert key(*first).encode() != key(*second).encode()


def test_key_in_chat_scope_cannot_collide_with_a_user_named_like_nothing():
    message = Message(text="x", platform="p", chat="c", user="null")
    assert conversation_key(message, "chat") != conversation_key(message, "user")
    assert conversation_key(message.replace(user=""), "chat") != conversation_key(message.replace(user=""), "user")


def test_key_round_trips_all_parts():
    message = Message(text="x", platform="p:1", chat='c"2', user="u\\3", thread="t,4")
    key = conversation_key(message)
    assert (key.platform, key.chat, key.thread, key.user) == ("p:1", 'c"2', "t,4", "u\\3")
    assert json.loads(key.encode()) == ["p:1", 'c"2', "t,4", "u\\3"]
    assert ConversationKey.decode(key.encode()) == key
    assert ConversationKey.decode(conversation_key(message, "chat").encode()).shared


def test_the_stored_form_of_a_key_is_the_one_older_files_hold():
    """SQLite files from before the typed key hold exactly this text; a new form would orphan them."""
    key = ConversationKey("telegram", "-100", None, "42")
    assert key.encode() == '["telegram", "-100", null, "42"]'
    assert ConversationKey("discord", "c", "t", None).encode() == '["discord", "c", "t", null]'



# ------------------------------------------------------------------ SQLite specifics

def test_sqlite_creates_file_in_nested_folder(tmp_path):
    path = tmp_path / "a" / "b" / "c" / "memory.sqlite3"
    memory = SQLiteMemory(path)
    try:
        assert path.is_file()
    finally:
        memory.close()


def test_sqlite_accepts_str_path_with_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    memory = SQLiteMemory("~/nested/mem.sqlite3")
    try:
        assert memory.path == tmp_path / "nested" / "mem.sqlite3"
        assert memory.path.is_file()
    finally:
        memory.close()


def test_sqlite_uses_wal(tmp_path):
    path = tmp_path / "m.sqlite3"
    memory = SQLiteMemory(path)
    try:
        assert memory._db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        memory.close()
    # WAL is persistent: another connection sees it on the file too.
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        other.close()


def test_sqlite_data_survives_close_and_reopen(tmp_path):
    path = tmp_path / "m.sqlite3"
    memory = SQLiteMemory(path)
    memory.add(K, turn("remember me", at=1.5, user="u", display_name="U"))
    memory.add(K, turn("and me", role="assistant", at=2.5))
    memory.close()

    reopened = SQLiteMemory(path)
    try:
        assert reopened.recent(K, 10) == [
            turn("remember me", at=1.5, user="u", display_name="U"),
            turn("and me", role="assistant", at=2.5),
        ]
        assert reopened.schema_version == len(MIGRATIONS)
        reopened.add(K, turn("after reopen", at=3.5))
        assert [t.text for t in reopened.recent(K, 10)] == ["remember me", "and me", "after reopen"]
    finally:
        reopened.close()


def test_sqlite_schema_version_matches_migrations(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    try:
        assert memory.schema_version == len(MIGRATIONS)
        assert len(MIGRATIONS) >= 1
        tables = {row[0] for row in memory._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "turns" in tables
    finally:
        memory.close()


def test_sqlite_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "future.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match=r"written by a newer chatforge \(schema \d+ > \d+\)"):
        SQLiteMemory(path)
    # The refused file is left as it was.
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
    finally:
        db.close()


def test_sqlite_refused_schema_closes_its_connection(tmp_path, monkeypatch):
    path = tmp_path / "future.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    db.commit()
    db.close()

    opened: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def recording_connect(*args, **kwargs):
        connection = real_connect(*args, **kwargs)
        opened.append(connection)
        return connection

    monkeypatch.setattr("chatforge.sqlite_memory.sqlite3.connect", recording_connect)
    with pytest.raises(RuntimeError):
        SQLiteMemory(path)
    assert len(opened) == 1
    # The connection (and its open file) is not left behind for the GC.
    with pytest.raises(sqlite3.ProgrammingError):
        opened[0].execute("SELECT 1")


def test_sqlite_add_is_durable_without_commit(tmp_path):
    path = tmp_path / "m.sqlite3"
    memory = SQLiteMemory(path)
    try:
        memory.add(K, turn("first", at=10.0))
        reader = sqlite3.connect(path)
        try:
            rows = reader.execute("SELECT conversation, role, text FROM turns").fetchall()
            assert rows == [(K.encode(), "user", "first")]
            memory.add(K, turn("second", role="assistant", at=11.0))
            rows = reader.execute("SELECT text FROM turns ORDER BY id").fetchall()
            assert rows == [("first",), ("second",)]
            assert memory.forget(K) == 2
            assert reader.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
        finally:
            reader.close()
    finally:
        memory.close()


def test_sqlite_fills_in_created_at_when_missing(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    try:
        memory.add(K, Turn(role="user", text="no time"))
        [back] = memory.recent(K, 1)
        assert back.created_at > 1_600_000_000  # a real timestamp, not 0
    finally:
        memory.close()


def test_sqlite_rejects_unknown_roles(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    try:
        with pytest.raises(sqlite3.IntegrityError):
            memory.add(K, Turn(role="system", text="nope", created_at=1.0))  # type: ignore[arg-type]
        assert memory.recent(K, 10) == []
    finally:
        memory.close()


def test_sqlite_in_memory_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    memory = SQLiteMemory(":memory:")
    try:
        memory.add(K, turn("ephemeral"))
        assert [t.text for t in memory.recent(K, 5)] == ["ephemeral"]
        assert memory.schema_version == len(MIGRATIONS)
    finally:
        memory.close()
    assert not (tmp_path / ":memory:").exists()


def test_sqlite_concurrent_adds_from_two_connections(tmp_path):
    """Two stores on one file (e.g. two processes) both keep every turn."""
    path = tmp_path / "m.sqlite3"
    first = SQLiteMemory(path)
    second = SQLiteMemory(path)
    try:
        def fill(store, tag):
            for i in range(50):
                store.add(K, turn(f"{tag}{i}"))

        threads = [threading.Thread(target=fill, args=(first, "a")),
                   threading.Thread(target=fill, args=(second, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        texts = [t.text for t in first.recent(K, 1000)]
        assert sorted(texts) == sorted([f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)])
    finally:
        first.close()
        second.close()


def test_sqlite_close_then_use_fails(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    memory.close()
    with pytest.raises(sqlite3.ProgrammingError):
        memory.add(K, turn("too late"))


# ------------------------------------------------------------------ whom a bot line answered

def test_an_old_database_learns_whom_each_bot_line_answered(tmp_path):
    """Schema 2 stored bot lines with no owner; the upgrade infers it from the line stored with them."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {version}; COMMIT;")
    shared = ConversationKey("p", "group", None, None)
    rows = [(shared.encode(), "user", "from ann", "ann", 10.0), (shared.encode(), "assistant", "to ann", "", 10.0),
            (shared.encode(), "user", "from bob", "bob", 20.0), (shared.encode(), "assistant", "to bob", "", 20.0),
            (shared.encode(), "assistant", "added alone by a plugin", "", 30.0)]
    db.executemany("INSERT INTO turns (conversation, role, text, user_id, created_at) VALUES (?, ?, ?, ?, ?)", rows)
    db.close()

    memory = SQLiteMemory(path)
    try:
        assert memory.schema_version == len(MIGRATIONS)
        assert [(t.text, t.reply_to) for t in memory.recent(shared, 10) if t.role == "assistant"] == [
            ("to ann", "ann"), ("to bob", "bob"), ("added alone by a plugin", "")]
        assert memory.forget_user("p", "ann") == 2
        assert [t.text for t in memory.recent(shared, 10)] == ["from bob", "to bob", "added alone by a plugin"]
    finally:
        memory.close()


def test_several_processes_opening_a_new_file_at_once_all_start(tmp_path):
    """Workers started together on one fresh file: one creates the schema, the others wait for it."""
    for attempt in range(4):
        path = tmp_path / f"fresh-{attempt}.sqlite3"
        barrier = threading.Barrier(6)
        opened, errors = [], []

        def open_it() -> None:
            try:
                barrier.wait(timeout=30)
                opened.append(SQLiteMemory(path))  # a connection of its own, as another process has
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        try:
            assert not errors, errors
            assert len(opened) == 6 and {memory.schema_version for memory in opened} == {len(MIGRATIONS)}
            opened[0].add(K, turn("one schema for all"))
            assert [t.text for t in opened[-1].recent(K, 5)] == ["one schema for all"]
        finally:
            for memory in opened:
                memory.close()
