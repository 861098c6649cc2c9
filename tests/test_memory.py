"""Tests for chatforge.memory: both backends behave the same; SQLite specifics; keys."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from chatforge.memory import (
    MIGRATIONS,
    InMemoryMemory,
    SQLiteMemory,
    Turn,
    conversation_key,
)
from chatforge.message import Message


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        backend = InMemoryMemory()
    else:
        backend = SQLiteMemory(tmp_path / "memory.sqlite3")
    yield backend
    backend.close()


def turn(text: str, role: str = "user", at: float = 1000.0, **extra) -> Turn:
    return Turn(role=role, text=text, created_at=at, **extra)


# ------------------------------------------------------------------ shared behaviour

def test_empty_conversation(store):
    assert store.recent("nobody", 10) == []
    assert store.forget("nobody") == 0


def test_recent_returns_turns_oldest_first(store):
    turns = [turn(f"line {i}", role="user" if i % 2 == 0 else "assistant", at=1000.0 + i) for i in range(5)]
    for item in turns:
        store.add("k", item)
    assert store.recent("k", 10) == turns


def test_count_is_per_conversation_and_follows_forget(store):
    assert store.count("k") == 0
    for i in range(5):
        store.add("k", turn(f"line {i}", at=1000.0 + i))
    store.add("other", turn("elsewhere"), turn("and again"))
    assert (store.count("k"), store.count("other")) == (5, 2)
    store.forget("k")
    assert (store.count("k"), store.count("other")) == (0, 2)


def test_recent_limit_keeps_the_newest(store):
    for i in range(6):
        store.add("k", turn(f"line {i}", at=1000.0 + i))
    assert [t.text for t in store.recent("k", 3)] == ["line 3", "line 4", "line 5"]
    assert [t.text for t in store.recent("k", 1)] == ["line 5"]
    assert len(store.recent("k", 6)) == 6
    assert len(store.recent("k", 100)) == 6


@pytest.mark.parametrize("limit", [0, -1])
def test_recent_non_positive_limit_is_empty(store, limit):
    store.add("k", turn("hello"))
    assert store.recent("k", limit) == []


def test_turn_fields_round_trip(store):
    original = Turn(role="assistant", text="héllo \"quoted\"\nnew line 🙂", created_at=1234.5,
                    user="u-42", display_name="Ada L.")
    store.add("k", original)
    [back] = store.recent("k", 1)
    assert back == original


def test_conversations_are_separate(store):
    store.add("a", turn("for a"))
    store.add("b", turn("for b"))
    assert [t.text for t in store.recent("a", 10)] == ["for a"]
    assert [t.text for t in store.recent("b", 10)] == ["for b"]


def test_forget_returns_count_and_removes_only_that_conversation(store):
    for i in range(3):
        store.add("gone", turn(f"g{i}"))
    store.add("kept", turn("k0"))
    store.add("kept", turn("k1"))
    assert store.forget("gone") == 3
    assert store.recent("gone", 10) == []
    assert [t.text for t in store.recent("kept", 10)] == ["k0", "k1"]
    # Forgetting again deletes nothing.
    assert store.forget("gone") == 0
    # The conversation can start over afterwards.
    store.add("gone", turn("fresh"))
    assert [t.text for t in store.recent("gone", 10)] == ["fresh"]


def test_concurrent_adds_lose_nothing(store):
    threads_count, per_thread = 8, 50
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                store.add(f"conv-{n % 2}", turn(f"{n}:{i}", at=1000.0 + i))
                store.add("shared", turn(f"{n}:{i}", at=1000.0 + i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)

    total = threads_count * per_thread
    shared = store.recent("shared", total * 2)
    assert len(shared) == total
    assert {t.text for t in shared} == {f"{n}:{i}" for n in range(threads_count) for i in range(per_thread)}
    # Each thread's own turns stay in the order it added them.
    for n in range(threads_count):
        mine = [int(t.text.split(":")[1]) for t in shared if t.text.startswith(f"{n}:")]
        assert mine == list(range(per_thread))
    assert len(store.recent("conv-0", total)) + len(store.recent("conv-1", total)) == total


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


def test_key_in_chat_scope_cannot_collide_with_a_user_named_like_nothing():
    message = Message(text="x", platform="p", chat="c", user="null")
    assert conversation_key(message, "chat") != conversation_key(message, "user")
    assert conversation_key(message.replace(user=""), "chat") != conversation_key(message.replace(user=""), "user")


def test_key_round_trips_all_parts():
    message = Message(text="x", platform="p:1", chat='c"2', user="u\\3", thread="t,4")
    assert json.loads(conversation_key(message)) == ["p:1", 'c"2', "t,4", "u\\3"]


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
    memory.add("k", turn("remember me", at=1.5, user="u", display_name="U"))
    memory.add("k", turn("and me", role="assistant", at=2.5))
    memory.close()

    reopened = SQLiteMemory(path)
    try:
        assert reopened.recent("k", 10) == [
            turn("remember me", at=1.5, user="u", display_name="U"),
            turn("and me", role="assistant", at=2.5),
        ]
        assert reopened.schema_version == len(MIGRATIONS)
        reopened.add("k", turn("after reopen", at=3.5))
        assert [t.text for t in reopened.recent("k", 10)] == ["remember me", "and me", "after reopen"]
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

    monkeypatch.setattr("chatforge.memory.sqlite3.connect", recording_connect)
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
        memory.add("k", turn("first", at=10.0))
        reader = sqlite3.connect(path)
        try:
            rows = reader.execute("SELECT conversation, role, text FROM turns").fetchall()
            assert rows == [("k", "user", "first")]
            memory.add("k", turn("second", role="assistant", at=11.0))
            rows = reader.execute("SELECT text FROM turns ORDER BY id").fetchall()
            assert rows == [("first",), ("second",)]
            assert memory.forget("k") == 2
            assert reader.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
        finally:
            reader.close()
    finally:
        memory.close()


def test_sqlite_fills_in_created_at_when_missing(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    try:
        memory.add("k", Turn(role="user", text="no time"))
        [back] = memory.recent("k", 1)
        assert back.created_at > 1_600_000_000  # a real timestamp, not 0
    finally:
        memory.close()


def test_sqlite_rejects_unknown_roles(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    try:
        with pytest.raises(sqlite3.IntegrityError):
            memory.add("k", Turn(role="system", text="nope", created_at=1.0))  # type: ignore[arg-type]
        assert memory.recent("k", 10) == []
    finally:
        memory.close()


def test_sqlite_in_memory_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    memory = SQLiteMemory(":memory:")
    try:
        memory.add("k", turn("ephemeral"))
        assert [t.text for t in memory.recent("k", 5)] == ["ephemeral"]
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
                store.add("k", turn(f"{tag}{i}"))

        threads = [threading.Thread(target=fill, args=(first, "a")),
                   threading.Thread(target=fill, args=(second, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        texts = [t.text for t in first.recent("k", 1000)]
        assert sorted(texts) == sorted([f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)])
    finally:
        first.close()
        second.close()


def test_sqlite_close_then_use_fails(tmp_path):
    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    memory.close()
    with pytest.raises(sqlite3.ProgrammingError):
        memory.add("k", turn("too late"))


# ------------------------------------------------------------------ whom a bot line answered

def test_reply_to_round_trips(store):
    store.add("k", turn("hi", user="ann"), turn("hello ann", role="assistant", reply_to="ann"))
    assert [t.reply_to for t in store.recent("k", 2)] == ["", "ann"]


def test_about_and_forget_user_take_the_replies_to_the_person_in_a_shared_chat(store):
    shared = json.dumps(["p", "group", None, None])
    store.add(shared, turn("from ann", user="ann"), turn("to ann", role="assistant", reply_to="ann"))
    store.add(shared, turn("from bob", user="bob"), turn("to bob", role="assistant", reply_to="bob"))
    assert [t.text for _, t in store.about_user("p", "ann")] == ["from ann", "to ann"]
    assert store.forget_user("p", "ann") == 2
    assert [t.text for t in store.recent(shared, 10)] == ["from bob", "to bob"]


def test_forget_one_persons_turns_of_a_conversation(store):
    shared = json.dumps(["p", "group", None, None])
    store.add(shared, turn("from ann", user="ann"), turn("to ann", role="assistant", reply_to="ann"))
    store.add(shared, turn("from bob", user="bob"), turn("to bob", role="assistant", reply_to="bob"))
    store.add("elsewhere", turn("ann elsewhere", user="ann"))
    assert store.forget(shared, user="ann") == 2
    assert [t.text for t in store.recent(shared, 10)] == ["from bob", "to bob"]
    assert store.count("elsewhere") == 1


def test_an_old_database_learns_whom_each_bot_line_answered(tmp_path):
    """Schema 2 stored bot lines with no owner; the upgrade infers it from the line stored with them."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN; {script}; PRAGMA user_version = {version}; COMMIT;")
    shared = json.dumps(["p", "group", None, None])
    rows = [(shared, "user", "from ann", "ann", 10.0), (shared, "assistant", "to ann", "", 10.0),
            (shared, "user", "from bob", "bob", 20.0), (shared, "assistant", "to bob", "", 20.0),
            (shared, "assistant", "added alone by a plugin", "", 30.0)]
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
