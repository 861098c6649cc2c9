"""`kill -9` loses no committed turn: memory survives a crash whole, in order, with no half turn.

`chatforge chat` runs in pipe mode on the tiny GPT-2 with SQLite memory in a
temporary file. A reply is printed only after its two turns are written
(autocommit, WAL, synchronous=FULL), so every reply seen on stdout before
the kill must be in the file after it. A small plugin makes the timing and
the text predictable where the test needs it:

- `slow` is answered after 5 s (it touches a file when it starts), so the
  kill certainly lands in the middle of a reply;
- `echo ...` is answered at once with `re:echo ...`, for bursts;
- `/mark N` prints `MARK N` (commands are not remembered), so the test can
  tell where a reply ends however many lines the model wrote.

Every wait is bounded.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

CHATFORGE = str(Path(sys.executable).parent / "chatforge")
STARTUP = 120  # seconds to import torch and load the tiny model on a busy machine
ANSWER = 60  # seconds for one answer

PLUGIN = '''
import time
from pathlib import Path
from chatforge import hookimpl

FLAG = Path(__file__).with_name("slow-started")


@hookimpl
def chatforge_register_commands(register):
    register("mark", lambda ctx: f"MARK {ctx.args}", help="print a marker line")


@hookimpl
def chatforge_handle_text(message):
    if message.text == "slow":
        FLAG.touch()
        time.sleep(5)
        return "slow done"
    if message.text.startswith("echo "):
        return f"re:{message.text}"
    return None
'''


@pytest.fixture
def config(tmp_path, tiny_gpt2, model_cache) -> Path:
    (tmp_path / "durable.py").write_text(PLUGIN)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""\
        generator:
          model: {tiny_gpt2}
          temperature: 0
          max_new_tokens: 8
          cache_dir: {model_cache}
        memory:
          path: {tmp_path / "memory.sqlite3"}
          max_turns: 1000
        limits:
          rate_per_minute: 100000
          rate_burst: 1000
          max_pending: 2000
        plugins:
          durable:
            module: ./durable.py
        adapters:
          console:
            user: tester
        """))
    return path


class Chat:
    """`chatforge chat` in pipe mode: lines in on stdin, reply lines read on a thread, stderr to a file."""

    def __init__(self, config: Path) -> None:
        self.err_path = config.parent / f"stderr-{time.monotonic_ns()}.txt"
        with self.err_path.open("w") as err:
            self.process = subprocess.Popen(
                [CHATFORGE, "chat", "--config", str(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=config.parent,
                text=True, encoding="utf-8", errors="replace")
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of output

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def send(self, *lines: str) -> None:
        self.process.stdin.write("".join(line + "\n" for line in lines))
        self.process.stdin.flush()

    def line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s; stderr:\n{self.stderr}") from None
        if line is None:
            raise AssertionError(f"chatforge ended (status {self.process.poll()}); stderr:\n{self.stderr}")
        return line

    def until(self, marker: str, timeout: float) -> list[str]:
        """The lines before `marker` (which is consumed)."""
        deadline = time.monotonic() + timeout
        lines = []
        while (line := self.line(max(0.1, deadline - time.monotonic()))) != marker:
            lines.append(line)
        return lines

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no close, no flush."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        assert self.process.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:  # a broken pipe to a dead process
                pass


def turns(database: Path) -> list[tuple[str, str]]:
    """(role, text) of every stored turn, oldest first, after checking the file is not corrupt.

    Opened read-write, as the next `chatforge` start would, so the WAL the
    killed process left is recovered first.
    """
    db = sqlite3.connect(database)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT DISTINCT conversation FROM turns").fetchall() in (
            [], [('["console", "console", null, "tester"]',)])
        return db.execute("SELECT role, text FROM turns ORDER BY id").fetchall()
    finally:
        db.close()


def assert_pairs(stored: list[tuple[str, str]]) -> None:
    """Turns come as (user, assistant) pairs: no user line without its answer, no answer alone."""
    roles = [role for role, _ in stored]
    assert roles == ["user", "assistant"] * (len(stored) // 2), \
        f"not whole user/assistant pairs; the last turns: {stored[-4:]}"


def test_kill_9_mid_reply_keeps_every_printed_turn(config, cli):
    database = config.parent / "memory.sqlite3"
    chat = Chat(config)
    printed: list[tuple[str, str]] = []
    try:
        for index in range(4):
            question = f"hello number {index}, how are you today?"
            chat.send(question, f"/mark {index}")
            reply = chat.until(f"MARK {index}", STARTUP if index == 0 else ANSWER)
            assert reply, f"no reply to {question!r}"
            printed.append((question, "\n".join(reply)))
        chat.send("echo a predictable answer", "/mark echo")
        assert chat.until("MARK echo", ANSWER) == ["re:echo a predictable answer"]
        printed.append(("echo a predictable answer", "re:echo a predictable answer"))

        chat.send("slow")
        flag = config.parent / "slow-started"
        deadline = time.monotonic() + ANSWER
        while not flag.exists():
            assert time.monotonic() < deadline, f"the slow reply never started; stderr:\n{chat.stderr}"
            assert chat.process.poll() is None, chat.stderr
            time.sleep(0.02)
        time.sleep(0.5)  # well inside the 5 s the reply takes
        chat.kill()
    finally:
        chat.close()

    expected = [turn for question, reply in printed for turn in (("user", question), ("assistant", reply))]
    stored = turns(database)
    assert stored[:len(expected)] == expected, "a turn printed before the kill is missing or changed"
    # The interrupted message left both its turns or none (it was killed before answering: none).
    assert stored[len(expected):] in ([], [("user", "slow"), ("assistant", "slow done")])
    assert_pairs(stored)

    # A new start reads the same memory, and goes on writing to it.
    result = cli("chat", "--config", str(config), stdin="/history\necho after the crash\n/history\n",
                 cwd=config.parent, timeout=STARTUP)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    history = "\n".join(["I remember 10 turns of this conversation:"]
                        + [f"{'You' if role == 'user' else 'chatforge'}: {text}" for role, text in expected])
    assert result.stdout.startswith(history + "\n"), result.stdout
    assert "I remember 12 turns of this conversation:" in result.stdout
    assert result.stdout.rstrip("\n").endswith("You: echo after the crash\nchatforge: re:echo after the crash")
    assert_pairs(turns(database))


@pytest.mark.parametrize("kill_after", [40, 150])
def test_kill_9_during_a_burst_leaves_whole_pairs(config, kill_after):
    """A burst of 400 instant answers, killed after `kill_after` of them were printed, three times over.

    Each kill lands while turns are being written as fast as the disk allows.
    The file must pass integrity_check, hold every printed answer, and hold
    whole user/assistant pairs in the order the lines were sent.
    """
    database = config.parent / "memory.sqlite3"
    printed: dict[str, list[str]] = {}  # burst -> the answers printed before its kill
    for cycle in range(3):
        name = f"echo burst {cycle}"
        chat = Chat(config)
        try:
            chat.send(*[f"{name}-{index}" for index in range(400)])
            printed[name] = [chat.line(STARTUP if index == 0 else ANSWER) for index in range(kill_after)]
            chat.kill()
        finally:
            chat.close()

        stored = turns(database)
        assert_pairs(stored)
        questions = [text for role, text in stored if role == "user"]
        answers = [text for role, text in stored if role == "assistant"]
        assert answers == [f"re:{question}" for question in questions], "an answer is stored with another question"
        assert [question.rsplit("-", 1)[0] for question in questions] == sorted(
            question.rsplit("-", 1)[0] for question in questions), "bursts interleaved in memory"
        for burst, answers_seen in printed.items():
            # Stored in the order sent, from the burst's start, without a gap (the rest never came),
            # and everything printed before the kill is there.
            numbers = [int(question.rsplit("-", 1)[1]) for question in questions if question.startswith(burst + "-")]
            assert numbers == list(range(len(numbers))), f"{burst}: stored out of order or with a gap"
            assert len(numbers) >= kill_after
            assert answers_seen == [f"re:{burst}-{index}" for index in range(kill_after)]
