"""The conformance suite for memory stores: what every backend must do, as pytest tests.

A backend's tests subclass `MemoryStoreContract` and give it two fixtures:

    from chatforge.testing import MemoryStoreContract

    class TestRedisMemory(MemoryStoreContract):
        @pytest.fixture
        def store(self):
            store = RedisMemory(url=...)       # an empty store
            yield store
            store.close()

        @pytest.fixture
        def second_store(self, store):
            return RedisMemory(url=...)          # another handle on the same data, as a second process
                                                 # would have it (the same object if the store is in-process)

sqlite, memory and postgres all run it (tests/test_memory.py, tests/test_postgres_memory.py).
"""

from __future__ import annotations

import threading
import time

import pytest

from .conversation import ConversationKey
from .memory import Turn

ANN = ConversationKey("p", "chat-1", None, "ann")
BOB = ConversationKey("p", "chat-1", None, "bob")
GROUP = ConversationKey("p", "group", None, None)
ELSEWHERE = ConversationKey("p", "chat-2", "thread 7", "ann")
OTHER_PLATFORM = ConversationKey("q", "chat-1", None, "ann")


def turn(text: str, role: str = "user", at: float = 1000.0, **extra) -> Turn:
    return Turn(role=role, text=text, created_at=at, **extra)


def texts(turns) -> list[str]:
    return [item.text for item in turns]


class MemoryStoreContract:
    """Subclass it with `store` and `second_store` fixtures; every test here must pass."""

    @pytest.fixture
    def store(self):
        raise NotImplementedError("give the suite a `store` fixture: an empty store")

    @pytest.fixture
    def second_store(self, store):
        raise NotImplementedError("give the suite a `second_store` fixture: another handle on the same data")

    # ------------------------------------------------------------ turns

    def test_an_unknown_conversation_is_empty(self, store):
        assert store.recent(ANN, 10) == []
        assert store.count(ANN) == 0
        assert store.forget(ANN) == 0

    def test_recent_gives_the_newest_turns_oldest_first(self, store):
        for index in range(6):
            store.add(ANN, turn(f"line {index}", role="user" if index % 2 == 0 else "assistant", at=1000.0 + index))
        assert texts(store.recent(ANN, 10)) == [f"line {index}" for index in range(6)]
        assert texts(store.recent(ANN, 3)) == ["line 3", "line 4", "line 5"]
        assert texts(store.recent(ANN, 1)) == ["line 5"]
        assert store.recent(ANN, 0) == [] and store.recent(ANN, -1) == []
        assert store.count(ANN) == 6

    def test_every_field_of_a_turn_round_trips(self, store):
        original = Turn(role="assistant", text='héllo "quoted"\nnew line 🙂 人工智能 \\ \' %s ?', created_at=1234.5,
                        user="u-42", display_name="Ada L.", meta={"sentiment": {"score": -0.5, "label": "bad"}},
                        reply_to="u-41")
        store.add(ANN, original)
        [back] = store.recent(ANN, 1)
        assert back == original
        assert back.meta == original.meta and back.reply_to == "u-41"

    def test_a_turn_without_a_time_is_stamped_now(self, store):
        before = time.time()
        store.add(ANN, Turn("user", "when?"))
        [back] = store.recent(ANN, 1)
        assert before - 1 <= back.created_at <= time.time() + 1

    def test_every_part_of_the_key_separates_conversations(self, store):
        keys = [ANN, BOB, GROUP, ELSEWHERE, OTHER_PLATFORM, ConversationKey("p", "chat-1", "", "ann"),
                ConversationKey("p", "chat-1", "None", "ann"), ConversationKey("p", "chat-1", None, ""),
                ConversationKey("p", 'chat"1', None, "ann"), ConversationKey("p", "chat-1, x", None, "ann")]
        for index, key in enumerate(keys):
            store.add(key, turn(f"for {index}"))
        assert [texts(store.recent(key, 10)) for key in keys] == [[f"for {index}"] for index in range(len(keys))]
        assert store.conversations() == keys  # every part read back as it was written

    def test_a_question_and_its_answer_are_added_together(self, store):
        store.add(ANN, turn("question", user="ann"), turn("answer", role="assistant", reply_to="ann"))
        assert [(t.role, t.text) for t in store.recent(ANN, 2)] == [("user", "question"), ("assistant", "answer")]

    def test_concurrent_adds_lose_nothing_and_keep_pairs_whole(self, store):
        writers, per_writer = 6, 30
        barrier = threading.Barrier(writers)
        errors: list[BaseException] = []

        def write(n: int) -> None:
            try:
                barrier.wait(timeout=30)
                for index in range(per_writer):
                    store.add(GROUP, turn(f"{n}:{index}?", user=f"u{n}"),
                              turn(f"{n}:{index}!", role="assistant", reply_to=f"u{n}"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors and not any(thread.is_alive() for thread in threads)
        stored = texts(store.recent(GROUP, writers * per_writer * 2 + 10))
        assert len(stored) == writers * per_writer * 2
        for question, answer in zip(stored[::2], stored[1::2]):
            assert question.endswith("?") and answer == question[:-1] + "!", (question, answer)
        for n in range(writers):  # each writer's turns in the order it added them
            mine = [int(text[len(f"{n}:"):-1]) for text in stored[::2] if text.startswith(f"{n}:")]
            assert mine == list(range(per_writer))

    def test_what_one_handle_adds_another_reads(self, store, second_store):
        store.add(ANN, turn("written by the first", user="ann"))
        assert texts(second_store.recent(ANN, 10)) == ["written by the first"]
        assert second_store.forget(ANN) == 1
        assert store.recent(ANN, 10) == []

    # ------------------------------------------------------------ forgetting

    def test_forget_deletes_one_conversation_and_it_can_start_again(self, store):
        for index in range(3):
            store.add(ANN, turn(f"a{index}"))
        store.add(BOB, turn("b0"))
        assert store.forget(ANN) == 3
        assert store.recent(ANN, 10) == [] and texts(store.recent(BOB, 10)) == ["b0"]
        assert store.forget(ANN) == 0
        store.add(ANN, turn("fresh"))
        assert texts(store.recent(ANN, 10)) == ["fresh"]

    def test_forget_one_persons_lines_and_the_replies_to_them_in_a_shared_conversation(self, store):
        store.add(GROUP, turn("from ann", user="ann"), turn("to ann", role="assistant", reply_to="ann"))
        store.add(GROUP, turn("from bob", user="bob"), turn("to bob", role="assistant", reply_to="bob"))
        store.add(ELSEWHERE, turn("ann elsewhere", user="ann"))
        assert store.forget(GROUP, user="ann") == 2
        assert texts(store.recent(GROUP, 10)) == ["from bob", "to bob"]
        assert store.count(ELSEWHERE) == 1

    def test_about_user_finds_a_person_everywhere_on_one_platform(self, store):
        store.add(ANN, turn("ann private", user="ann", at=1.0), turn("to ann", role="assistant", reply_to="ann", at=1.0))
        store.add(GROUP, turn("ann in the group", user="ann", at=2.0),
                  turn("to ann in the group", role="assistant", reply_to="ann", at=2.0))
        store.add(GROUP, turn("bob in the group", user="bob", at=3.0),
                  turn("to bob in the group", role="assistant", reply_to="bob", at=3.0))
        store.add(BOB, turn("bob private", user="bob", at=4.0))
        store.add(OTHER_PLATFORM, turn("ann on q", user="ann", at=5.0))
        found = store.about_user("p", "ann")
        assert [(key, t.text) for key, t in found] == [
            (ANN, "ann private"), (ANN, "to ann"), (GROUP, "ann in the group"), (GROUP, "to ann in the group")]
        assert all(isinstance(key, ConversationKey) for key, _ in found)
        assert store.about_user("p", "nobody") == []

    def test_forget_user_deletes_exactly_what_about_user_shows(self, store):
        store.add(ANN, turn("ann private", user="ann"))
        store.add(GROUP, turn("ann in the group", user="ann"), turn("to ann", role="assistant", reply_to="ann"))
        store.add(GROUP, turn("bob in the group", user="bob"), turn("to bob", role="assistant", reply_to="bob"))
        store.add(OTHER_PLATFORM, turn("ann on q", user="ann"))
        assert store.forget_user("p", "ann") == 3
        assert store.about_user("p", "ann") == []
        assert texts(store.recent(GROUP, 10)) == ["bob in the group", "to bob"]
        assert texts(store.recent(OTHER_PLATFORM, 10)) == ["ann on q"]
        assert store.forget_user("p", "ann") == 0

    def test_purge_before_deletes_only_older_turns(self, store):
        store.add(ANN, turn("old", at=100.0), turn("older answer", role="assistant", at=100.0))
        store.add(ANN, turn("new", at=200.0))
        store.add(BOB, turn("old too", at=50.0))
        assert store.purge_before(150.0) == 3
        assert texts(store.recent(ANN, 10)) == ["new"] and store.count(BOB) == 0
        assert store.purge_before(150.0) == 0

    # ------------------------------------------------------------ listing (chatforge finetune reads them all)

    def test_conversations_lists_every_key_with_turns_once_oldest_first(self, store):
        assert store.conversations() == []
        store.add(GROUP, turn("first", at=1.0), turn("reply", role="assistant", at=1.0))
        store.add(ANN, turn("second", user="ann", at=2.0))
        store.add(GROUP, turn("again", at=3.0))
        store.add(OTHER_PLATFORM, turn("third", user="ann", at=4.0))
        store.add(ELSEWHERE, turn("fourth", user="ann", at=5.0))
        assert store.conversations() == [GROUP, ANN, OTHER_PLATFORM, ELSEWHERE]
        assert all(isinstance(key, ConversationKey) for key in store.conversations())
        assert store.conversations(platform="p") == [GROUP, ANN, ELSEWHERE]
        assert store.conversations(platform="q") == [OTHER_PLATFORM]
        assert store.conversations(platform="nowhere") == []

    def test_a_forgotten_conversation_is_no_longer_listed(self, store):
        store.add(ANN, turn("a", user="ann", at=1.0))
        store.add(BOB, turn("b", user="bob", at=2.0))
        store.add(GROUP, turn("from ann", user="ann", at=3.0), turn("to ann", role="assistant", reply_to="ann", at=3.0))
        store.forget(ANN)
        store.forget_user("p", "ann")
        assert store.conversations() == [BOB]
        store.add(ANN)  # no turns: still nothing to list
        assert store.conversations() == [BOB]

    # ------------------------------------------------------------ several processes

    def test_an_event_is_claimed_once_across_handles(self, store, second_store):
        assert store.claim("telegram:1001") is True
        assert store.claim("telegram:1001") is False
        assert second_store.claim("telegram:1001") is False
        assert second_store.claim("telegram:1002") is True
        assert store.claim("discord:1001") is True  # ids are per platform

    def test_concurrent_claims_of_one_event_have_one_winner(self, store, second_store):
        barrier = threading.Barrier(8)
        results: list[bool] = []

        def take(handle) -> None:
            barrier.wait(timeout=30)
            results.append(handle.claim("telegram:race"))

        threads = [threading.Thread(target=take, args=(store if n % 2 else second_store,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(results) == [False] * 7 + [True]

    def test_the_conversation_lock_can_be_taken_again_once_released(self, store):
        for _ in range(3):
            with store.lock(ANN):
                store.add(ANN, turn("under the lock"))
        assert store.count(ANN) == 3
