"""Load: 1,000 messages from 50 users across many chats, nothing lost, crossed or reordered.

In-process, through the engine with a generator that answers after a short
random pause (so conversations really overlap); then through the real
`chatforge run` subprocess and the fake Telegram Bot API. Throughput and
memory figures are printed (shown even under -q); no assertion is on time.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import pytest

from chatforge.conversation import ConversationKey
from chatforge.memory import InMemoryMemory, Turn, conversation_key
from chatforge.sqlite_memory import SQLiteMemory
from chatforge.memory import window_start
from chatforge.testing import make_bot
from processes import terminate

CHATS = 10
USERS_PER_CHAT = 5
MESSAGES_PER_USER = 20
TOTAL = CHATS * USERS_PER_CHAT * MESSAGES_PER_USER  # 1,000
MAX_TURNS = 20  # memory.max_turns: the history the generator sees is windowed after 10 messages
ROUND_TIMEOUT = 120  # seconds for 1,000 messages in-process (they take a second or two)


def figure(capsys, line: str) -> None:
    """Print a measured figure so it shows in the pytest output, even under -q and capture."""
    with capsys.disabled():
        print(f"\n[load] {line}", flush=True)


class PausingGenerator:
    """A generator with the real one's interface that awaits a seeded random 0-5 ms before answering.

    Its reply encodes the message and how many turns of history it saw. It
    records the history it was given for every message, how many replies
    were in progress at once, and fails if two messages of one conversation
    were ever generated at the same time (the engine promises one at a time).
    """

    name = "pausing-fake"

    def __init__(self, seed: int = 1234, max_pause: float = 0.005, record: bool = True, scope: str = "user") -> None:
        self.scope = scope
        self.random = random.Random(seed)
        self.max_pause = max_pause
        self.record = record
        self.seen: dict[str, tuple[tuple[str, str], ...]] = {}
        self.calls = 0
        self.active: set[str] = set()
        self.max_active = 0
        self.overlaps: list[str] = []  # texts that started while their conversation was busy

    @staticmethod
    def reply_for(text: str, turns: int) -> str:
        return f"re:{text} h={turns}"

    async def reply(self, history: Sequence[Turn], text: str, on_text=None) -> str:
        # Whose conversation: "r0-chat3-user2" (memory.scope user) or "r0-chat3" (scope chat).
        owner = text.rsplit("-n", 1)[0] if self.scope == "user" else text.rsplit("-user", 1)[0]
        if owner in self.active:
            self.overlaps.append(text)
        self.active.add(owner)
        self.max_active = max(self.max_active, len(self.active))
        try:
            await asyncio.sleep(self.random.uniform(0, self.max_pause))
        finally:
            self.active.discard(owner)
        self.calls += 1
        if self.record:
            assert text not in self.seen, f"the generator was asked twice about {text!r}"
            self.seen[text] = tuple((turn.role, turn.text) for turn in history)
        answer = self.reply_for(text, len(history))
        if on_text is not None:
            on_text(answer)
        return answer

    async def complete(self, instruction: str, max_new_tokens: int | None = None) -> str:
        return await self.reply([], instruction)

    def close(self) -> None:
        pass


def text_of(round_: int, chat: int, user: int, n: int) -> str:
    return f"r{round_}-chat{chat}-user{user}-n{n}"


def fields_of(round_: int, chat: int, user: int) -> dict:
    """The Message fields of a user in a group chat; ids are unique per round (new conversations)."""
    return {"platform": "test", "chat": f"r{round_}-chat{chat}", "user": f"r{round_}-chat{chat}-user{user}",
            "display_name": f"User {chat}.{user}", "direct": False, "mentioned": True}


def make_memory(kind: str, tmp_path: Path):
    return InMemoryMemory() if kind == "memory" else SQLiteMemory(tmp_path / "load.sqlite3")


def stored_keys(memory) -> set[ConversationKey]:
    """Every conversation key the store holds (to prove nothing went to a conversation of its own)."""
    if isinstance(memory, InMemoryMemory):
        return set(memory._turns)
    with memory._lock:
        return {ConversationKey.decode(row[0]) for row in memory._db.execute("SELECT DISTINCT conversation FROM turns")}


def stored_count(memory) -> int:
    if isinstance(memory, InMemoryMemory):
        return sum(len(turns) for turns in memory._turns.values())
    with memory._lock:
        return memory._db.execute("SELECT count(*) FROM turns").fetchone()[0]


async def run_round(bot, round_: int, mode: str, scope: str) -> tuple[dict, dict, float]:
    """Send one round of 1,000 messages; (text -> reply, conversation -> texts in completion order, seconds).

    per-user: each user's 20 messages are sent one after the other (a coroutine
    per user), the 50 users at once. all-at-once: the 1,000 messages start
    together, interleaved across users, so the engine's per-conversation FIFO
    decides the order (tasks start, and reach the conversation's queue, in
    the order they were created).
    """
    replies: dict[str, str | None] = {}
    completed: dict[str, list[str]] = defaultdict(list)

    async def ask(chat: int, user: int, n: int) -> None:
        text = text_of(round_, chat, user, n)
        fields = fields_of(round_, chat, user)
        reply = await bot.ask_async(text, **fields)
        assert text not in replies, f"{text!r} answered twice"
        replies[text] = reply
        completed[conversation_key(bot.message(text, **fields), scope)].append(text)

    async def one_user(chat: int, user: int) -> None:
        for n in range(MESSAGES_PER_USER):
            await ask(chat, user, n)

    started = time.perf_counter()
    if mode == "per-user":
        work = [one_user(chat, user) for chat in range(CHATS) for user in range(USERS_PER_CHAT)]
    else:
        work = [ask(chat, user, n) for n in range(MESSAGES_PER_USER)
                for chat in range(CHATS) for user in range(USERS_PER_CHAT)]
    await asyncio.wait_for(asyncio.gather(*work), ROUND_TIMEOUT)
    return replies, completed, time.perf_counter() - started


def expected_order(bot, round_: int, mode: str, scope: str) -> dict[str, list[tuple[str, dict]]]:
    """conversation key -> its messages (text, fields) in the order they were sent."""
    order: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    if mode == "per-user":
        sends = [(chat, user, n) for chat in range(CHATS) for user in range(USERS_PER_CHAT)
                 for n in range(MESSAGES_PER_USER)]
    else:
        sends = [(chat, user, n) for n in range(MESSAGES_PER_USER)
                 for chat in range(CHATS) for user in range(USERS_PER_CHAT)]
    for chat, user, n in sends:
        text, fields = text_of(round_, chat, user, n), fields_of(round_, chat, user)
        order[conversation_key(bot.message(text, **fields), scope)].append((text, fields))
    return order


@pytest.mark.parametrize("memory_kind", ["memory", "sqlite"])
@pytest.mark.parametrize("mode, scope", [("per-user", "user"), ("all-at-once", "user"), ("all-at-once", "chat")])
def test_1000_messages_through_the_engine(tmp_path, capsys, memory_kind, mode, scope):
    generator = PausingGenerator(scope=scope)
    memory = make_memory(memory_kind, tmp_path)
    bot = make_bot({"memory": {"max_turns": MAX_TURNS, "scope": scope}, "limits": {"max_pending": 2000}},
                   generator=generator, memory=memory)
    loop = asyncio.new_event_loop()
    try:
        replies, completed, seconds = loop.run_until_complete(run_round(bot, 0, mode, scope))
        figure(capsys, f"engine {mode}/{scope}/{memory_kind}: {TOTAL} messages in {seconds:.2f} s = "
                       f"{TOTAL / seconds:,.0f} messages/s; up to {generator.max_active} replies in progress at once")

        conversations = expected_order(bot, 0, mode, scope)
        assert len(conversations) == (CHATS if scope == "chat" else CHATS * USERS_PER_CHAT)
        # Every message answered exactly once, with an answer to that very message.
        assert len(replies) == TOTAL and generator.calls == TOTAL and len(generator.seen) == TOTAL
        for key, sent in conversations.items():
            # ...and in the order the conversation's messages were sent.
            assert completed[key] == [text for text, _ in sent], f"replies out of order in {key}"
            turns: list[tuple[str, str]] = []
            for k, (text, fields) in enumerate(sent):
                context = turns[window_start(len(turns), MAX_TURNS):]
                assert replies[text] == PausingGenerator.reply_for(text, len(context))
                # The generator saw exactly this conversation's latest turns, nothing of another.
                assert generator.seen[text] == tuple(context), text
                turns += [("user", text), ("assistant", replies[text])]
            remembered = bot.memory.recent(key, 10**6)
            assert [(turn.role, turn.text) for turn in remembered] == turns, f"memory of {key}"
            users = [turn.user for turn in remembered if turn.role == "user"]
            assert users == [fields["user"] for _, fields in sent]
            assert bot.history(**sent[0][1]) == remembered[-MAX_TURNS:]
        assert stored_keys(bot.memory) == set(conversations)
        assert stored_count(bot.memory) == 2 * TOTAL

        assert generator.overlaps == [], "two messages of one conversation were generated at once"
        assert generator.max_active > 1, "conversations never overlapped: the test did not load anything"
        # Nothing is left behind in the engine's per-conversation bookkeeping.
        assert bot.engine.queue.pending == 0
        assert not bot.engine.queue._locks and not bot.engine.queue._waiting
        assert bot.engine.answered == TOTAL
    finally:
        loop.run_until_complete(bot.engine.close())
        loop.close()


def test_memory_stays_bounded_over_rounds(tmp_path, capsys):
    """Three rounds of 1,000 messages in new conversations: Python memory does not grow with messages.

    SQLite keeps the turns in its file and its own (untraced) page cache, so
    what tracemalloc sees after a round is the engine's and plugins' state.
    A leak of 256 bytes a message (a Message object kept, say) would add
    256 KB a round; what does grow is the rate limiter's bucket for each new
    user (about 20 KB for 50 users, capped at 100,000 users).
    """
    generator = PausingGenerator(record=False)
    bot = make_bot({"memory": {"max_turns": MAX_TURNS}, "limits": {"max_pending": 2000}},
                   generator=generator, memory=SQLiteMemory(tmp_path / "rounds.sqlite3"))
    loop = asyncio.new_event_loop()
    after: list[int] = []
    try:
        loop.run_until_complete(run_round(bot, 99, "all-at-once", "user"))  # warm up imports and caches
        gc.collect()
        tracemalloc.start()
        try:
            for round_ in range(3):
                replies, _, seconds = loop.run_until_complete(run_round(bot, round_, "all-at-once", "user"))
                assert len(replies) == TOTAL and all(replies.values())
                del replies
                gc.collect()
                after.append(tracemalloc.get_traced_memory()[0])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        figure(capsys, "engine memory (tracemalloc, SQLite store): after rounds "
                       + ", ".join(f"{size / 2**20:.2f} MB" for size in after)
                       + f"; peak {peak / 2**20:.1f} MB; growth round 2 -> 3: {(after[2] - after[1]) / 1024:.0f} KB")
        assert after[2] - after[1] < 256 * 1024, "memory grows with the number of messages"
        assert peak < 200 * 2**20
        assert bot.engine.queue.pending == 0 and not bot.engine.queue._locks
        assert stored_count(bot.memory) == 2 * 4 * TOTAL
    finally:
        loop.run_until_complete(bot.engine.close())
        loop.close()


# ---------------------------------------------------------------- the real `chatforge run` over Telegram

TOKEN = "123456789:AAF-fake-load-token-Yr7pQ"
CHATFORGE = str(Path(sys.executable).parent / "chatforge")
STARTUP = 120  # seconds to import torch, load the tiny model and reach the fake Bot API
ALL_ANSWERED = 240  # seconds for the 1,000 answers (about 25-60 s here)
GROUPS = 9  # supergroups of 5 users, where the bot is @mentioned...
PRIVATE = 5  # ...and users who talk to it in a private chat: 50 users, 14 chats


def telegram_senders() -> list[tuple[int, int, bool]]:
    """(chat id, user id, group?) for the 50 users."""
    senders = [(-1002000000000 - chat, 880000 + chat * 10 + user, True)
               for chat in range(GROUPS) for user in range(USERS_PER_CHAT)]
    senders += [(890000 + user, 890000 + user, False) for user in range(PRIVATE)]
    return senders


def test_1000_messages_through_chatforge_run_and_telegram(tmp_path, capsys, tiny_gpt2, model_cache):
    """1,000 updates from 50 users in 14 chats, answered by the tiny GPT-2 (4 new tokens, greedy).

    Each answer must be sent exactly once, in the right chat, as a reply to
    its message, in the order the chat's messages came; memory must hold
    every conversation's turns in order with the answers that were sent.
    """
    from fake_telegram import BOT_USERNAME, FakeTelegram

    senders = telegram_senders()
    assert len(senders) == 50 and len({chat for chat, _, _ in senders}) == GROUPS + PRIVATE
    with FakeTelegram(TOKEN) as fake:
        config = tmp_path / "config.yaml"
        config.write_text(textwrap.dedent(f"""\
            generator:
              model: {tiny_gpt2}
              temperature: 0
              max_new_tokens: 4
              cache_dir: {model_cache}
            memory:
              path: {tmp_path / "memory.sqlite3"}
            limits:
              rate_per_minute: 100000
              rate_burst: 1000
              max_pending: 2000
            adapters:
              console:
                enabled: false
              telegram:
                enabled: true
                token: ${{LOAD_TG_TOKEN}}
                base_url: {fake.base_url}
                poll_timeout: 1
            """))
        out, err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOAD_TG_TOKEN": TOKEN}
        process = subprocess.Popen([CHATFORGE, "run", "--config", str(config)], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
        stderr = lambda: (tmp_path / "stderr.txt").read_text()  # noqa: E731
        try:
            def polling() -> bool:
                assert process.poll() is None, f"chatforge exited with {process.returncode}:\n{stderr()}"
                return fake.count("setMyCommands") > 0 and fake.count("getUpdates") > 0
            fake.wait_for(polling, STARTUP, "the bot to start polling")

            incoming: dict[int, tuple[int, int, str]] = {}  # message id -> (chat, user, text the engine gets)
            started = time.monotonic()
            for n in range(MESSAGES_PER_USER):  # interleaved, as busy chats are
                for chat, user, group in senders:
                    text = f"tg-chat{chat}-user{user}-n{n}"
                    sent = fake.enqueue_message(f"@{BOT_USERNAME} {text}" if group else text, chat_id=chat,
                                                user_id=user, group=group, first_name=f"U{user}")
                    incoming[sent["message_id"]] = (chat, user, text)
            assert len(incoming) == TOTAL

            def answers() -> list:
                assert process.poll() is None, f"chatforge exited with {process.returncode}:\n{stderr()}"
                return [call for call in fake.calls_to("sendMessage") if call.status == 200]
            fake.wait_for(lambda: len(answers()) >= TOTAL, ALL_ANSWERED, f"{TOTAL} answers")
            seconds = max(call.at for call in answers()) - started
            fake.wait_polls(2, 15)  # anything more it had to say, it has said by now
            time.sleep(1)
        finally:
            status = terminate(process, 30)
            out.close()
            err.close()
        figure(capsys, f"chatforge run + Telegram + tiny GPT-2: {TOTAL} messages answered in {seconds:.1f} s = "
                       f"{TOTAL / seconds:.1f} messages/s")

    assert status == 0, stderr()
    assert "Traceback" not in stderr(), stderr()
    sent = [call for call in fake.calls_to("sendMessage")]
    assert all(call.status == 200 for call in sent)
    assert len(sent) == TOTAL, f"{len(sent)} answers to {TOTAL} messages"
    answered: dict[int, str] = {}
    order: dict[int, list[int]] = defaultdict(list)  # chat -> message ids in the order they were answered
    for call in sent:
        replying_to = call.params["reply_parameters"]["message_id"]
        assert replying_to in incoming and replying_to not in answered, f"an answer to {replying_to}"
        chat, _user, _text = incoming[replying_to]
        assert int(call.params["chat_id"]) == chat, "an answer went to another chat"
        assert call.params["text"].strip()
        answered[replying_to] = call.params["text"]
        order[chat].append(replying_to)
    assert set(answered) == set(incoming)
    for chat, answered_ids in order.items():  # one chat's messages are answered in the order they came
        assert answered_ids == sorted(answered_ids), f"chat {chat} answered out of order"

    db = sqlite3.connect(tmp_path / "memory.sqlite3")
    try:
        rows = db.execute("SELECT conversation, role, text, user_id FROM turns ORDER BY id").fetchall()
    finally:
        db.close()
    remembered: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for conversation, role, text, user_id in rows:
        remembered[conversation].append((role, text, user_id))
    expected: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for message_id in sorted(incoming):
        chat, user, text = incoming[message_id]
        key = json.dumps(["telegram", str(chat), None, str(user)])
        expected[key] += [("user", text, str(user)), ("assistant", answered[message_id], "")]
    assert set(remembered) == set(expected)
    for key in expected:
        assert remembered[key] == expected[key], f"memory of {key}"
