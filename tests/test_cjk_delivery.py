"""A long Chinese reply with emoji, end to end through the real discord.py and python-telegram-bot clients.

The adapters run in this process against the loopback fakes (tests/fake_discord.py, tests/fake_telegram.py),
answered by a generator that streams a known text in pieces cut anywhere (as a model's tokens are), so no
model is loaded. Every part that reaches the platform must fit its limit as the platform counts it, begin
and end between user-perceived characters, and the parts must give back the reply.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from chatforge.adapters.discord import LIMIT as DISCORD_LIMIT
from chatforge.adapters.discord import DiscordAdapter, DiscordConfig
from chatforge.adapters.telegram import MESSAGE_LIMIT as TELEGRAM_LIMIT
from chatforge.adapters.telegram import TelegramAdapter, TelegramConfig, telegram_length
from chatforge.delivery import utf16_length
from chatforge.testing import FakeGenerator, make_bot
from fake_discord import DM_CHANNEL_ID, FakeDiscord, user
from fake_telegram import FakeTelegram
from test_delivery import FAMILY, FLAG, SCOTLAND, SENTENCE_END, THUMB, boundaries, chinese, rejoin

TELEGRAM_TOKEN = "123456789:AAF-cjk-test-token-Zq8xW"
DISCORD_TOKEN = "cjk-test-token-Zq8xWv3Kp"
ALICE = user("100000000000000031", "alice")
WITHIN = 20  # seconds for the whole reply to arrive

# Paragraphs, then one paragraph of 6,000 characters without a line break, then a run without punctuation
# with a ZWJ family and flags in it; about 13,000 code points, more UTF-16 code units (the emoji count 2).
REPLY = (chinese(3_000, sentences_per_paragraph=5) + "\n\n" + chinese(6_000) + "\n\n"
         + ("没有标点的一长串文字" + FAMILY + FLAG + THUMB + SCOTLAND) * 150 + "\n\n全文完。🎉")


class StreamingGenerator(FakeGenerator):
    """Writes REPLY in pieces of 7 code points, so that characters of several code points arrive in halves."""

    def __init__(self) -> None:
        super().__init__(lambda history, text: REPLY)

    async def reply(self, history, text, on_text=None) -> str:
        self.calls.append((list(history), text))
        for start in range(0, len(REPLY), 7):
            if on_text is not None:
                on_text(REPLY[start:start + 7])
            if start % 140 == 0:
                await asyncio.sleep(0.005)  # about 0.4 s of streaming: a few edits at a 0.1 s interval
        return REPLY


def assert_delivered(parts: list[str], limit: int) -> None:
    assert len(parts) >= utf16_length(REPLY) // limit + 1
    too_long = [utf16_length(part) for part in parts if utf16_length(part) > limit]
    assert not too_long, f"parts over {limit} UTF-16 code units: {too_long}"
    spans = rejoin(parts, REPLY)  # in order, nothing lost, no cut inside a character
    run = REPLY.index("没有标点")
    for part, (_, end) in zip(parts[:-1], spans):
        if end < run:  # before the run without punctuation, a part ends with a paragraph or a sentence
            assert REPLY[end] == "\n" or SENTENCE_END.search(part), f"cut mid-sentence: …{part[-8:]!r}"


def test_the_reply_measures_more_in_utf16_than_in_code_points():
    assert utf16_length(REPLY) - len(REPLY) > 1_000 and len(REPLY) > 10_000
    assert telegram_length(REPLY) == utf16_length(REPLY)


def test_telegram_length_counts_a_lone_surrogate_instead_of_raising():
    assert telegram_length("好\ud83d") == 2


def assert_previews_whole(shown: list[str]) -> None:
    """While streaming past the limit, the message showed the start of the reply, cut between characters, and "…"."""
    previews = [text for text in shown if text.endswith("…")]
    assert previews, "the stream never went past the limit"
    for text in previews:
        assert REPLY.startswith(text[:-1]) and len(text) - 1 in boundaries(REPLY), f"…{text[-8:]!r}"


async def _serve(adapter: Any, engine: Any, scenario: Any) -> None:
    running = asyncio.create_task(adapter.run())
    try:
        await scenario(running)
    finally:
        await asyncio.wait_for(adapter.stop(), 10)
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 10)
        await engine.close()


async def _until(condition: Any, timeout: float, what: str, running: asyncio.Task) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if running.done():
            raise AssertionError(f"the adapter stopped while waiting for {what}: {running.exception()!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True], ids=["sent", "streamed"])
def test_telegram_gets_a_long_chinese_reply_in_parts_within_4096_utf16_units(stream):
    bot = make_bot(generator=StreamingGenerator())
    chat = 8001
    with FakeTelegram(TELEGRAM_TOKEN) as fake:
        config = TelegramConfig(enabled=True, token=TELEGRAM_TOKEN, base_url=fake.base_url, poll_timeout=1,
                                stream=stream, stream_interval=0.1)

        async def scenario(running: asyncio.Task) -> None:
            await _until(lambda: fake.count("getUpdates") > 0, WITHIN, "polling", running)
            fake.enqueue_message("请写一篇很长的文章", chat_id=chat, user_id=chat)
            await _until(lambda: any(call.params.get("text", "").endswith("全文完。🎉")
                                     for call in fake.sent_messages(chat)), WITHIN, "the last part", running)

        asyncio.run(asyncio.wait_for(_serve(TelegramAdapter(bot.engine, config), bot.engine, scenario), 60))
        sent = fake.sent_messages(chat)
        edits = [call for call in fake.calls_to("editMessageText", chat_id=chat) if call.status == 200]
    shown = [call.params["text"] for call in sent + edits]
    assert all(utf16_length(text) <= TELEGRAM_LIMIT for text in shown), "a send or an edit over the limit"
    first = edits[-1].params["text"] if edits else sent[0].params["text"]
    if stream:
        assert edits and all(edit.params["message_id"] == sent[0].result["message_id"] for edit in edits)
        assert_previews_whole(shown)
    else:
        assert not edits
    assert_delivered([first] + [call.params["text"] for call in sent[1:]], TELEGRAM_LIMIT)


@pytest.mark.parametrize("stream", [False, True], ids=["sent", "streamed"])
def test_discord_gets_a_long_chinese_reply_in_parts_within_2000(stream):
    bot = make_bot(generator=StreamingGenerator())
    with FakeDiscord(DISCORD_TOKEN) as fake:
        config = DiscordConfig(enabled=True, token=DISCORD_TOKEN, api_base=fake.api_base,
                               gateway_url=fake.gateway_url, stream=stream, stream_interval=0.1)

        async def scenario(running: asyncio.Task) -> None:
            await asyncio.to_thread(fake.wait_ready, WITHIN)
            since = fake.mark()
            await asyncio.to_thread(fake.dispatch_dm, "请写一篇很长的文章", ALICE)
            await _until(lambda: any((r.body or {}).get("content", "").endswith("全文完。🎉")
                                     for r in fake.sent_messages(DM_CHANNEL_ID, since)), WITHIN, "the last part",
                         running)

        asyncio.run(asyncio.wait_for(_serve(DiscordAdapter(bot.engine, config), bot.engine, scenario), 60))
        sent = fake.sent_messages(DM_CHANNEL_ID)
        edits = fake.find("PATCH", rf"/channels/{DM_CHANNEL_ID}/messages/\d+", where=lambda r: r.status == 200)
    shown = [r.body["content"] for r in sent + edits]
    assert all(utf16_length(text) <= DISCORD_LIMIT for text in shown), "a send or an edit over the limit"
    first = edits[-1].body["content"] if edits else sent[0].body["content"]
    assert bool(edits) == stream
    if stream:
        assert_previews_whole(shown)
    assert_delivered([first] + [r.body["content"] for r in sent[1:]], DISCORD_LIMIT)
