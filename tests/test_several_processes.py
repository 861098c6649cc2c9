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

The memory is a fixture parameter (`shared_memory`): one SQLite file; a
PostgreSQL database (the `postgres` fixtures of conftest.py; skipped where
PostgreSQL is not installed); and the same with the server restarted in the
middle of the run. Through that outage replies are still sent, turns may be
lost but each loss is logged, an update is answered twice only if it was
delivered twice while its claim could not be checked (and the worker says
so), and a last message from every user after the outage is stored. Another
backend is one more `SharedMemory` (its YAML lines and how the test opens
the store to check it). Every process and server the test starts is stopped
by it; every wait is bounded.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from chatforge.conversation import ConversationKey
from chatforge.memory import MemoryStore
from chatforge.sqlite_memory import SQLiteMemory
from fake_openai import MODEL, FakeOpenAI
from fake_telegram import BOT_ID, BOT_USERNAME, Call, FakeTelegram
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
OUTAGE_AFTER = 300  # answers before the store is restarted, in the variant with an outage


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
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables the workers need (a database URL with its password)."""
    secrets: tuple[str, ...] = ()
    """What must never appear in a worker's output."""
    outage: Callable[[], None] | None = None
    """Called once in the middle of the run (after OUTAGE_AFTER answers): the store goes away and comes back.
    Turns may then be lost (each loss logged), and updates redelivered while the claims could not be made
    may be answered twice (each such update logged); everything else is checked as without an outage."""
    recovery: float = 0.0
    """Seconds the store waits after a failed call before it tries the server again."""


def sqlite_memory(request, folder: Path) -> SharedMemory:
    path = folder / "shared.sqlite3"

    def rows() -> int:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM turns").fetchone()[0]

    return SharedMemory("sqlite", f"backend: sqlite\npath: {path}", lambda: SQLiteMemory(path), rows)


def postgres_memory(request, folder: Path, restart: bool = False) -> SharedMemory:
    """A fresh database on the session's PostgreSQL server (tests/postgres.py); skipped where it is not
    installed. With `restart`, the server is restarted (stopped fast, started again) in the middle of the run."""
    url = request.getfixturevalue("postgres_url")
    server = request.getfixturevalue("postgres")
    from chatforge.postgres_memory import RETRY_AFTER, PostgresMemory

    def rows() -> int:
        import psycopg

        with psycopg.connect(url, connect_timeout=10) as conn:
            return conn.execute("SELECT count(*) FROM chatforge_turns").fetchone()[0]

    return SharedMemory("postgres" + (" restarted" if restart else ""), "backend: postgres\nurl: ${SP_DATABASE_URL}",
                        lambda: PostgresMemory(url), rows, env={"SP_DATABASE_URL": url},
                        secrets=(url, server.password), outage=server.restart if restart else None,
                        recovery=RETRY_AFTER)


BACKENDS: dict[str, Callable[..., SharedMemory]] = {
    "sqlite": sqlite_memory,
    "postgres": postgres_memory,
    "postgres-restarted": lambda request, folder: postgres_memory(request, folder, restart=True),
}


@pytest.fixture(params=list(BACKENDS))
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

    def __init__(self, name: str, config: Path, env: dict[str, str]) -> None:
        self.name = name
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SP_WORKER": name, "SP_TG_TOKEN": TOKEN,
               "SP_TG_WEBHOOK_SECRET": SECRET, **env}
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
        self.answered_count = threading.Condition(self.lock)

    @staticmethod
    def chats() -> list[int]:
        return [-1003000000000 - chat for chat in range(CHATS)]

    def users(self) -> list[tuple[int, int]]:
        """(chat id, user id) of the 50 users."""
        return [(chat_id, 930000 + chat * 10 + user) for chat, chat_id in enumerate(self.chats())
                for user in range(USERS_PER_CHAT)]

    def send(self, chat: int, user: int, n: int) -> None:
        text = f"sp-chat{chat}-user{user}-n{n}"
        with self.lock:  # recorded before its answer can be looked up
            message = self.fake.enqueue_message(f"@{BOT_USERNAME} {text}", chat_id=chat, user_id=user, group=True,
                                                first_name=f"U{user}")
            self.sent[message["message_id"]] = Sent(chat, user, n, text)

    def start(self) -> None:
        for chat, user in self.users():
            self.send(chat, user, 0)

    def wait_answered(self, count: int, timeout: float) -> bool:
        """Wait until `count` messages have had an answer; False after `timeout` seconds."""
        with self.lock:
            return self.answered_count.wait_for(lambda: len(self.answers) >= count, timeout)

    def answered(self, call: Call) -> None:
        replying_to = (call.params.get("reply_parameters") or {}).get("message_id")
        with self.lock:
            asked = self.sent.get(replying_to)
            if asked is None:
                self.unexpected.append(call)
                return
            self.answers[replying_to].append(call)
            first = len(self.answers[replying_to]) == 1
            self.answered_count.notify_all()
        if first and asked.n + 1 < MESSAGES_PER_USER:
            self.send(asked.chat, asked.user, asked.n + 1)


def test_two_workers_answer_1000_messages_each_once_in_order_with_one_memory(tmp_path, capsys, shared_memory):
    """What is checked (with an outage, `SharedMemory.outage` says what may differ):

    - one setWebhook call (worker A's), no deleteWebhook; every delivery accepted; the load balancer
      spread the updates and delivered 50 of them a second time, each to the other worker;
    - every message answered exactly once, in its chat, as a reply to it;
    - each answer saw the whole conversation so far (how many turns, and the previous question),
      though the other process often stored them; and consecutive messages did change process;
    - the memory afterwards: in each conversation every question once with its answer right after it,
      in the order they were sent; everything kept about a user in their one conversation; nothing else;
    - no worker logged a traceback, the token, the webhook secret or the database password.
    """
    outage = shared_memory.outage
    with FakeTelegram(TOKEN) as telegram, FakeOpenAI() as openai:
        people = People(telegram)
        telegram.on_sent = people.answered
        ports = free_ports(len(WORKERS))
        workers: list[Worker] = []
        try:
            for index, name in enumerate(WORKERS):  # A registers the webhook; B only serves
                config = worker_config(tmp_path / f"worker-{name}", name, ports[index], index == 0,
                                       shared_memory, telegram, openai)
                workers.append(Worker(name, config, shared_memory.env))
            for worker in workers:
                telegram.wait_for(worker.connected, STARTUP, f"worker {worker.name} to start")
            assert telegram.count("setWebhook") == 1
            assert telegram.webhook["url"] == "https://bot.example.com/telegram-hook"

            # The load balancer: round-robin over the workers, with the secret A registered.
            telegram.deliver([f"http://127.0.0.1:{port}/telegram-hook" for port in ports], redeliver=redelivered)
            started = time.monotonic()
            people.start()
            if outage is not None:
                assert people.wait_answered(OUTAGE_AFTER, ALL_ANSWERED), f"{OUTAGE_AFTER} answers before the outage"
                outage()
                outage_over = len(people.answers)
            if not people.wait_answered(TOTAL, max(1.0, started + ALL_ANSWERED - time.monotonic())):
                raise AssertionError(f"{len(people.answers)} of {TOTAL} messages answered after {ALL_ANSWERED} s; "
                                     f"calls: {telegram.summary()}")
            seconds = time.monotonic() - started
            if outage is not None:
                # Storing resumes: once the store's quiet period after a failure is over, a last message from
                # every user (the first call a worker makes finds the server back).
                time.sleep(2 * shared_memory.recovery + 1)
                for chat, user in people.users():
                    people.send(chat, user, MESSAGES_PER_USER)
                assert people.wait_answered(len(people.sent), 60), "the answers after the outage"
            # Let the late redeliveries (300 ms) arrive, and any answer to them be sent.
            expected_again = sum(redelivered(update_id) is not None for update_id in range(1, len(people.sent) + 1))
            telegram.wait_for(lambda: len([d for d in telegram.deliveries if d.redelivery]) == expected_again, 10,
                              "the redeliveries")
            time.sleep(1.5)
            statuses = [worker.stop() for worker in workers]
        finally:
            for worker in workers:
                worker.stop()
        with capsys.disabled():
            print(f"\n[several processes] {len(WORKERS)} workers ({shared_memory.name}): {TOTAL} messages from "
                  f"{len(people.users())} users answered in {seconds:.1f} s = {TOTAL / seconds:.0f} messages/s"
                  + (f"; the store was back after answer {outage_over}" if outage is not None else ""), flush=True)

    logs = "\n".join(worker.output for worker in workers)
    for worker in workers:
        assert "Traceback" not in worker.output, worker.output[-5000:]
        for secret in (SECRET, TOKEN, *shared_memory.secrets):
            assert secret not in worker.output, f"worker {worker.name} logged a secret"
    assert statuses == [0, 0], [worker.output[-3000:] for worker in workers]
    assert telegram.callback_errors == [] and people.unexpected == []
    assert telegram.count("setWebhook") == 1 and telegram.count("deleteWebhook") == 0
    assert all(call.status == 200 for call in telegram.calls_to("sendMessage"))

    # The load balancer did spread the updates, and did deliver 5% twice, to the other worker.
    deliveries = list(telegram.deliveries)
    assert all(delivery.status == 200 for delivery in deliveries), "a worker refused a delivery"
    first = {d.update_id: d.target for d in deliveries if not d.redelivery}
    again = {d.update_id: d.target for d in deliveries if d.redelivery}
    assert len(first) == len(people.sent) and len(again) == expected_again
    assert all(again[update_id] != first[update_id] for update_id in again)
    per_worker = [list(first.values()).count(index) for index in range(len(WORKERS))]
    assert min(per_worker) >= TOTAL // 3, per_worker

    # Every message answered exactly once, redelivered ones too. With an outage, a redelivered update may
    # be answered twice if a worker could not check its claim (the engine then answers: better twice than
    # never), and says so.
    messages_per_user = MESSAGES_PER_USER + (1 if outage is not None else 0)  # the last after the outage
    assert len(people.sent) == len(people.users()) * messages_per_user and set(people.answers) == set(people.sent)
    update_of = {d.message_id: d.update_id for d in deliveries}
    unchecked = {message for message, update_id in update_of.items()
                 if f"could not check whether telegram:{BOT_ID}:{update_id} was already answered" in logs}
    twice = {message for message, calls in people.answers.items() if len(calls) != 1}
    if outage is None:
        assert unchecked == set()
    assert twice <= unchecked & {d.message_id for d in deliveries if d.redelivery}, \
        f"answered more than once: {sorted(people.sent[message].text for message in twice - unchecked)}"

    store = shared_memory.open()
    try:
        stored: dict[tuple[int, int], list[tuple[str, str, str]]] = {}
        for chat, user in people.users():
            key = ConversationKey("telegram", str(chat), None, str(user))
            turns = store.recent(key, 10 * MESSAGES_PER_USER)
            stored[chat, user] = [(turn.role, turn.text, turn.user) for turn in turns]
            assert [turn.reply_to for turn in turns if turn.role == "assistant"] == \
                [str(user)] * len([turn for turn in turns if turn.role == "assistant"])
            # Everything kept about the user is in that one conversation.
            assert {found for found, _ in store.about_user("telegram", str(user))} <= {key}
        total_rows = shared_memory.rows() if shared_memory.rows is not None else None
    finally:
        store.close()

    handoffs = pairs = 0
    for (chat, user), turns in stored.items():
        key = ConversationKey("telegram", str(chat), None, str(user))
        mine = sorted((asked.n, message) for message, asked in people.sent.items()
                      if (asked.chat, asked.user) == (chat, user))
        assert [n for n, _ in mine] == list(range(messages_per_user))
        # Stored: each question with one of its answers right after it, in the order they were sent.
        questions = [f"sp-chat{chat}-user{user}-n{n}" for n in range(messages_per_user)]
        assert [role for role, _, _ in turns] == ["user", "assistant"] * (len(turns) // 2), f"memory of {key}"
        stored_order = [questions.index(question) for _, question, _ in turns[::2]]
        assert {speaker for _, _, speaker in turns[::2]} <= {str(user)}, f"another user's turns in {key}"
        for n, (_, answer, _) in zip(stored_order, turns[1::2]):
            assert answer in [call.params["text"] for call in people.answers[mine[n][1]]], f"{answer} of {key}"
        # An update answered twice during an outage may be stored with either answer, or both: anywhere.
        doubled = {n for n in range(messages_per_user) if mine[n][1] in twice}
        in_order = [n for n in stored_order if n not in doubled]
        assert in_order == sorted(set(in_order)), f"the memory of {key} is out of order: {stored_order}"
        assert all(stored_order.count(n) <= len(people.answers[mine[n][1]]) for n in doubled)
        kept = sorted(set(stored_order))
        lost = messages_per_user - len(kept)
        if outage is None:
            assert lost == 0 and len(turns) == 2 * MESSAGES_PER_USER, f"the memory of {key}"
        else:  # each lost turn said so; and storing resumed after the outage
            assert lost <= logs.count(f"could not save a turn of {key} "), f"{lost} turns of {key} lost silently"
            assert kept[-1] == messages_per_user - 1, f"the last message of {key}, after the outage, was not stored"
        # Each answer (the first, if two) saw the conversation as stored before it, whichever process
        # stored it: all of it, or, in an outage, what could be kept (none if reading failed, said so).
        workers_seen = []
        for n, message in mine:
            call = people.answers[message][0]
            assert int(call.params["chat_id"]) == chat, f"the answer to {questions[n]} went to another chat"
            answer = ANSWER.fullmatch(call.params["text"])
            assert answer is not None, call.params["text"]
            workers_seen.append(answer.group("worker"))
            if message in twice:
                continue
            before = [k for k in stored_order if k < n]
            expected = (questions[n], str(2 * len(before)), questions[before[-1]] if before else "-")
            if answer.group("text", "turns", "last") != expected:
                unread = answer.group("text", "turns", "last") == (questions[n], "0", "-") \
                    and f"could not read the conversation {key} " in logs
                doubled_before = any(mine[k][1] in twice for k in range(n))  # then its history may hold it twice
                assert outage is not None and (unread or doubled_before), \
                    f"{questions[n]} was answered without the conversation's earlier turns: {call.params['text']}"
        handoffs += sum(a != b for a, b in zip(workers_seen, workers_seen[1:]))
        pairs += messages_per_user - 1
    assert handoffs >= pairs // 4, f"only {handoffs} of {pairs} consecutive messages changed process"
    if total_rows is not None:  # nothing stored in any conversation but these
        assert total_rows == sum(len(turns) for turns in stored.values())
    if outage is not None and "memory: lost PostgreSQL" in logs:  # a quick restart may cost no failed call
        assert "is back; turns are stored again" in logs
    with capsys.disabled():
        lost_turns = sum(2 * messages_per_user - len(turns) for turns in stored.values())
        print(f"[several processes] {handoffs} of {pairs} consecutive messages of a conversation were answered "
              f"by the other worker; {len(again)} updates delivered twice, {len(twice)} answered twice "
              f"(claims unchecked during the outage); {lost_turns} turns lost", flush=True)
