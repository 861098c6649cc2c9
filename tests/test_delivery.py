"""Splitting long replies, keeping the typing indicator up, and streaming by rate-limited edits."""

from __future__ import annotations

import asyncio
import html
import re
import time

import pytest

from chatforge.delivery import RetryAfter, StreamingReply, keep_typing, split_message

CODE = "```python\n" + "\n".join(f"print({i})  # " + "x" * 40 for i in range(120)) + "\n```"
LONG = ("First paragraph, short.\n\n" + "\n".join(f"line {i}: " + "word " * 25 for i in range(50))
        + "\n\nThe code:\n" + CODE + "\n\nLast words.")


def fences_balanced(part: str) -> bool:
    return len(re.findall(r"^\s*```", part, re.MULTILINE)) % 2 == 0


@pytest.mark.parametrize("limit", [2000, 4096, 500])
def test_every_part_fits_and_no_code_fence_is_left_open(limit):
    parts = split_message(LONG, limit)
    assert len(parts) > 1
    assert all(len(part) <= limit for part in parts)
    assert all(fences_balanced(part) for part in parts)
    for i in range(120):
        assert sum(f"print({i})  #" in part for part in parts) == 1  # every code line, exactly once


def test_a_split_code_block_reopens_with_its_language():
    parts = split_message(CODE, 1000)
    assert len(parts) >= 6
    assert all(part.startswith("```python\n") and part.endswith("\n```") for part in parts)


def test_cuts_at_paragraphs_before_lines():
    paragraphs = ["alpha " * 50, "beta " * 50, "gamma " * 50]
    parts = split_message("\n\n".join(p.strip() for p in paragraphs), 700)
    assert [part.split()[0] for part in parts] == ["alpha", "gamma"]
    assert parts[0].endswith("beta")


def test_short_text_is_one_part_unchanged():
    text = "Hello!\n\nHere is a list:\n- one\n- two\n```\ncode\n```"
    assert split_message(text, 2000) == [text]


def test_a_very_long_word_is_cut_hard():
    parts = split_message("x" * 5000, 2000)
    assert [len(p) for p in parts] == [2000, 2000, 1000]


def test_an_unclosed_fence_is_closed():
    assert split_message("```\nprint(1)", 2000) == ["```\nprint(1)\n```"]


def test_limit_counts_the_escaped_length():
    text = "<b>&</b> " * 600
    measure = lambda part: len(html.escape(part, quote=False))  # noqa: E731
    parts = split_message(text, 4096, measure)
    assert all(measure(part) <= 4096 for part in parts) and len(parts) >= 2


def test_keep_typing_refreshes_until_done_and_survives_failures():
    calls = []

    async def show():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise ConnectionError("typing failed")

    async def main():
        async with keep_typing(show, every=0.05):
            await asyncio.sleep(0.28)
        count = len(calls)
        await asyncio.sleep(0.15)
        return count

    count = asyncio.run(main())
    assert 4 <= count <= 7 and len(calls) == count  # refreshed, then stopped


class FakeChat:
    """A platform that records sends and edits and can answer 429 a few times."""

    def __init__(self, limited: int = 0, retry_after: float = 0.2) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.limited = limited
        self.retry_after = retry_after

    async def send(self, text: str) -> int:
        self.events.append((time.monotonic(), "send", text))
        return 1

    async def edit(self, handle: int, text: str) -> None:
        if self.limited:
            self.limited -= 1
            self.events.append((time.monotonic(), "429", text))
            raise RetryAfter(self.retry_after)
        self.events.append((time.monotonic(), "edit", text))


async def stream(chat: FakeChat, words: int, delay: float, interval: float, limit: int = 2000):
    reply = StreamingReply(chat.send, chat.edit, interval=interval, limit=limit)
    text = ""
    for i in range(words):
        piece = f" word{i}" if i else "word0"
        text += piece
        reply.on_text(piece)
        await asyncio.sleep(delay)
    rest = await reply.finish(text)
    return reply, text, rest


def test_streaming_edits_at_most_once_per_interval_and_ends_with_the_final_text():
    chat = FakeChat()
    reply, text, rest = asyncio.run(stream(chat, words=40, delay=0.01, interval=0.1))
    kinds = [kind for _, kind, _ in chat.events]
    assert kinds[0] == "send" and kinds.count("send") == 1 and rest == []
    assert chat.events[-1][2] == text  # the final text is always delivered
    times = [t for t, kind, _ in chat.events]
    assert all(b - a >= 0.095 for a, b in zip(times, times[1:]))
    assert 2 <= len(times) <= 8  # ~0.4 s of streaming at one edit per 0.1 s


def test_streaming_honours_retry_after():
    chat = FakeChat(limited=2, retry_after=0.2)
    reply, text, _ = asyncio.run(stream(chat, words=30, delay=0.01, interval=0.05))
    refused = [t for t, kind, _ in chat.events if kind == "429"]
    edits = [t for t, kind, _ in chat.events if kind == "edit"]
    assert len(refused) == 2 and edits
    assert edits[0] - refused[-1] >= 0.19  # waited as long as the platform asked
    assert chat.events[-1] == (chat.events[-1][0], "edit", text)


def test_streaming_a_reply_longer_than_one_message_returns_the_rest():
    chat = FakeChat()
    reply, text, rest = asyncio.run(stream(chat, words=60, delay=0.001, interval=0.02, limit=100))
    shown = chat.events[-1][2]
    assert len(shown) <= 100 and rest and all(len(part) <= 100 for part in rest)
    assert (shown + " " + " ".join(rest)).split() == text.split()
