"""Several `chatforge run` processes behind one Telegram webhook, sharing one memory.

Two real worker processes serve the same bot in webhook mode; the loopback
fake Bot API (tests/fake_telegram.py) plays Telegram behind a load balancer:
it POSTs each update to the workers in turn, several in flight, and
delivers about 5% of the updates a second time to the other worker (as
Telegram does when a POST was not answered in time). 50 users in 10 group
chats send 20 messages each, every user their next one only once the bot's
answer to the previous one has arrived, as people do. So consecutive
messages of one conversation are answered by different processes, and each
answer depends on turns the other process stored.

The generator is a plugin that answers at once and says what it was given:
the message, how many turns of history, the last question in them, and
which worker answered. No model is loaded (the `openai` backend is
configured, against tests/fake_openai.py, only so that nothing imports
torch), so the 1,000 messages take seconds.

The memory is a fixture parameter (`shared_memory`): one SQLite file now;
another backend is a `SharedMemory` more (its YAML lines and how the test
opens the store to check it). Every process and server the test starts is
stopped by it; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from chatforge.conversation import ConversationKey
from chatforge.memory import MemoryStore
from chatforge.sqlite_memory import SQLiteMemory
from fake_openai import MODEL, FakeOpenAI
from fake_telegram import BOT_USERNAME, Call, FakeTelegram
from processes import terminate

TOKEN = "123456789:AAF-fake-workers-token-Hq4Lm"
SECRET = "several-Workers_share-this-3xR"
CHATFORGE = str(Path(sys.executable).parent / "chatforge")
WORKERS = ("A", "B")
CHATS = 10
USERS_PER_CHAT = 5
MESSAGES_PER_USER = 20
TOTAL = CHATS * USERS_PER_CHAT * MESSAGES_PER_USER  # 1,000
STARTUP = 60  # seconds for a worker to start (no model to load)
ALL_ANSWERED = 120  # seconds for the 1,000 answers (about 10 here)


def redelivered(update_id: int) -> float | None:
    """Every 20th update (5%) is delivered again to the other worker: at once (racing the first
    delivery), 50 ms later (while it is being answered) or 300 ms later (most often answered by then)."""
    return (0.0, 0.05, 0.3)[update_id // 20 % 3] if update_id % 20 == 7 else None


# Answers at once with what it was given; the worker's name comes from its environment.
ECHO_PLUGIN = '''
import os
from chatforge import hookimpl

WORKER = os.environ["SP_WORKER"]

@hookimpl
def chatforge_startup(bot):
    async def reply(history, text, on_text=None):
        last = next((turn.text for turn in reversed(history) if turn.role == "user"), "-")
        return f"re:{text} h={len(history)} last={last} w={WORKER}"

    bot.generator.reply = reply
'''
ANSWER = re.compile(r"re:(?P<text>\S+) h=(?P<turns>\d+) last=(?P<last>\S+) w=(?P<worker>\w+)")


# ---------------------------------------------------------------- the shared memory, by backend


@dataclass
class SharedMemory:
    """One memory every worker is configured with, and how the test reads it afterwards."""

    name: str
    yaml: str
    """The backend's lines of the `memory:` section."""
    open: Callable[[], MemoryStore]
    """The store, opened by the test to check what the workers stored (closed by the test)."""
    rows: Callable[[], int] | None = None
    """How many turns the store holds in all, if the backend can say (to find turns stored elsewhere)."""


def sqlite_memory(folder: Path) -> SharedMemory:
    path = folder / "shared.sqlite3"

    def rows() -> int:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM turns").fetchone()[0]

    return SharedMemory("sqlite", f"backend: sqlite\npath: {path}", lambda: SQLiteMemory(path), rows)


# A PostgreSQL variant is a `postgres` entry here: `memory.backend: postgres` with `url: <postgres_url>`,
# opened through its backend class (and, for an outage, `postgres.restart()` in the middle of the run).
BACKENDS = {"sqlite": lambda request, folder: sqlite_memory(folder)}


@pytest.fixture(params=sorted(BACKENDS))
def shared_memory(request, tmp_path) -> SharedMemory:
    return BACKENDS[request.param](request, tmp_path)


# ---------------------------------------------------------------- the workers


def worker_config(folder: Path, name: str, port: int, registers: bool, memory: SharedMemory,
                  telegram: FakeTelegram, openai: FakeOpenAI) -> Path:
    folder.mkdir()
    (folder / "echo.py").write_text(ECHO_PLUGIN)
    config = folder / "config.yaml"
    config.write_text(textwrap.dedent("""\
        generator:
          backend: openai
          base_url: {openai}
          model: {model}
        memory:
          max_turns: 50  # the whole conversation: every answer must see every earlier turn
        {memory}
        limits:  # the test talks faster than people; rate limits have their own tests
          rate_per_minute: 100000
          rate_burst: 1000
          max_pending: 2000
        plugins:
          telegram:
            module: chatforge.adapters.telegram
          echo:
            module: ./echo.py
        adapters:
          console:
            enabled: false
          telegram:
            enabled: true
            token: ${{SP_TG_TOKEN}}
            base_url: {telegram}
            mode: webhook
            listen: 127.0.0.1
            port: {port}
            url: https://bot.example.com/telegram-hook
            secret_token: ${{SP_TG_WEBHOOK_SECRET}}
            set_webhook: {registers}
        """).format(openai=openai.base_url, model=MODEL, memory=textwrap.indent(memory.yaml, "  "),
                    telegram=telegram.base_url, port=port, registers=str(registers).lower()))
    return config


class Worker:
    """One `chatforge run`; output goes to files so that a full pipe never blocks it."""

    def __init__(self, name: str, config: Path) -> None:
        self.name, self.port = name, 0
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SP_WORKER": name, "SP_TG_TOKEN": TOKEN,
               "SP_TG_WEBHOOK_SECRET": SECRET}
        self.out_path, self.err_path = config.parent / "stdout.txt", config.parent / "stderr.txt"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen([CHATFORGE, "run", "--config", str(config)], stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, env=env, cwd=config.parent)

    @property
    def output(self) -> str:
        return self.err_path.read_text() + self.out_path.read_text()

    def connected(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"worker {self.name} exited with {self.process.returncode}:\n{self.output}")
        return "telegram: connected as" in self.output

    def stop(self) -> int:
        return terminate(self.process, 30)


def free_ports(count: int) -> list[int]:
    import socket

    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


# ---------------------------------------------------------------- the people


@dataclass(frozen=True)
class Sent:
    chat: int
    user: int
    n: int
    text: str
    """What the engine gets (the @mention taken out)."""


class People:
    """50 users in 10 groups; each sends their next message when the answer to the previous one arrives.

    `answered` is called by the fake on its own loop with every sendMessage it served.
    """

    def __init__(self, fake: FakeTelegram) -> None:
        self.fake = fake
        self.lock = threading.Lock()
        self.sent: dict[int, Sent] = {}  # message id -> what it was
        self.answers: dict[int, list[Call]] = defaultdict(list)  # message id -> the answers to it
        self.unexpected: list[Call] = []  # answers to no message of ours
        self.done = threading.Event()

    @staticmethod
    def chats() -> list[int]:
        return [-1003000000000 - chat for chat in range(CHATS)]

    def users(self) -> list[tuple[int, int]]:
        """(chat id, user id) of the 50 users."""
        return [(chat_id, 930000 + chat * 10 + user) for chat, chat_id in enumerate(self.chats())
                for user in range(USERS_PER_CHAT)]

    def send(self, chat: int, user: int, n: int) -> None:
        text = f"sp-chat{chat}-user{user}-n{n}"
        message = self.fake.enqueue_message(f"@{BOT_USERNAME} {text}", chat_id=chat, user_id=user, group=True,
                                            first_name=f"U{user}")
        with self.lock:
            self.sent[message["message_id"]] = Sent(chat, user, n, text)

    def start(self) -> None:
        for chat, user in self.users():
            self.send(chat, user, 0)

    def answered(self, call: Call) -> None:
        replying_to = (call.params.get("reply_parameters") or {}).get("message_id")
        with self.lock:
            asked = self.sent.get(replying_to)
            if asked is None:
                self.unexpected.append(call)
                return
            self.answers[replying_to].append(call)
            first = len(self.answers[replying_to]) == 1
            if first and len(self.answers) == TOTAL:
                self.done.set()
        if first and asked.n + 1 < MESSAGES_PER_USER:
            self.send(asked.chat, asked.user, asked.n + 1)


def test_two_workers_answer_1000_messages_each_once_in_order_with_one_memory(tmp_path, capsys, shared_memory):
    with FakeTelegram(TOKEN) as telegram, FakeOpenAI() as openai:
        people = People(telegram)
        telegram.on_sent = people.answered
        ports = free_ports(len(WORKERS))
        workers: list[Worker] = []
        try:
            for index, name in enumerate(WORKERS):  # A registers the webhook; B only serves
                config = worker_config(tmp_path / f"worker-{name}", name, ports[index], index == 0,
                                       shared_memory, telegram, openai)
                workers.append(Worker(name, config))
            for worker in workers:
                telegram.wait_for(worker.connected, STARTUP, f"worker {worker.name} to start")
            assert telegram.count("setWebhook") == 1
            assert telegram.webhook["url"] == "https://bot.example.com/telegram-hook"

            # The load balancer: round-robin over the workers, with the secret A registered.
            telegram.deliver([f"http://127.0.0.1:{port}/telegram-hook" for port in ports], redeliver=redelivered)
            started = time.monotonic()
            people.start()
            if not people.done.wait(ALL_ANSWERED):
                raise AssertionError(f"{len(people.answers)} of {TOTAL} messages answered after {ALL_ANSWERED} s; "
                                     f"calls: {telegram.summary()}")
            seconds = time.monotonic() - started
            # Let the late redeliveries (300 ms) arrive, and any answer to them be sent.
            telegram.wait_for(lambda: len([d for d in telegram.deliveries if d.redelivery]) == TOTAL // 20, 10,
                              "the redeliveries")
            time.sleep(1.5)
            statuses = [worker.stop() for worker in workers]
        finally:
            for worker in workers:
                worker.stop()
        with capsys.disabled():
            print(f"\n[several processes] {len(WORKERS)} workers ({shared_memory.name}): {TOTAL} messages from "
                  f"{len(people.users())} users answered in {seconds:.1f} s = {TOTAL / seconds:.0f} messages/s",
                  flush=True)

    for worker in workers:
        assert "Traceback" not in worker.output, worker.output
        assert SECRET not in worker.output and TOKEN not in worker.output
    assert statuses == [0, 0], [worker.output[-3000:] for worker in workers]
    assert telegram.callback_errors == [] and people.unexpected == []
    assert telegram.count("setWebhook") == 1 and telegram.count("deleteWebhook") == 0
    assert all(call.status == 200 for call in telegram.calls_to("sendMessage"))

    # The load balancer did spread the updates, and did deliver 5% twice, to the other worker.
    deliveries = list(telegram.deliveries)
    assert all(delivery.status == 200 for delivery in deliveries), "a worker refused a delivery"
    first = {d.update_id: d.target for d in deliveries if not d.redelivery}
    again = {d.update_id: d.target for d in deliveries if d.redelivery}
    assert len(first) == TOTAL and len(again) == TOTAL // 20
    assert all(again[update_id] != first[update_id] for update_id in again)
    per_worker = [list(first.values()).count(index) for index in range(len(WORKERS))]
    assert min(per_worker) >= TOTAL // 3, per_worker

    # Every message answered exactly once (redelivered ones too), in its chat, as a reply to it, by a
    # worker that saw every earlier turn of the conversation, whichever process had stored them.
    assert len(people.sent) == TOTAL
    twice = {people.sent[message].text: len(calls) for message, calls in people.answers.items() if len(calls) != 1}
    assert twice == {}, f"answered more than once: {twice}"
    assert set(people.answers) == set(people.sent)
    answers: dict[tuple[int, int], list[str]] = defaultdict(list)  # (chat, user) -> answers in send order
    workers_of: dict[tuple[int, int], list[str]] = defaultdict(list)
    for message_id, asked in sorted(people.sent.items(), key=lambda item: item[1].n):
        (call,) = people.answers[message_id]
        assert int(call.params["chat_id"]) == asked.chat, f"the answer to {asked.text} went to another chat"
        answer = ANSWER.fullmatch(call.params["text"])
        assert answer is not None, call.params["text"]
        previous = f"sp-chat{asked.chat}-user{asked.user}-n{asked.n - 1}" if asked.n else "-"
        assert answer.group("text", "turns", "last") == (asked.text, str(2 * asked.n), previous), \
            f"{asked.text} was answered without the conversation's earlier turns: {call.params['text']}"
        answers[asked.chat, asked.user].append(call.params["text"])
        workers_of[asked.chat, asked.user].append(answer.group("worker"))
    handoffs = sum(a != b for names in workers_of.values() for a, b in zip(names, names[1:]))
    pairs = len(workers_of) * (MESSAGES_PER_USER - 1)
    assert set(name for names in workers_of.values() for name in names) == set(WORKERS)
    assert handoffs >= pairs // 4, f"only {handoffs} of {pairs} consecutive messages changed process"

    # The memory, read afterwards: each conversation holds each question once with its answer right after
    # it, in the order they were sent, and nobody's turns are anywhere else.
    store = shared_memory.open()
    try:
        for (chat, user), sent_answers in answers.items():
            key = ConversationKey("telegram", str(chat), None, str(user))
            expected = []
            for n, answer_text in enumerate(sent_answers):
                expected += [("user", f"sp-chat{chat}-user{user}-n{n}", str(user)), ("assistant", answer_text, "")]
            stored = [(turn.role, turn.text, turn.user) for turn in store.recent(key, 10 * MESSAGES_PER_USER)]
            assert stored == expected, f"the memory of user {user} in chat {chat}"
            assert [turn.reply_to for turn in store.recent(key, 100) if turn.role == "assistant"] == \
                [str(user)] * MESSAGES_PER_USER
            # Everything kept about the user is in that one conversation.
            assert {found for found, _ in store.about_user("telegram", str(user))} == {key}
        if shared_memory.rows is not None:
            assert shared_memory.rows() == 2 * TOTAL
    finally:
        store.close()
    with capsys.disabled():
        print(f"[several processes] {handoffs} of {pairs} consecutive messages of a conversation were answered "
              f"by the other worker; {len(again)} updates delivered twice, each answered once", flush=True)
