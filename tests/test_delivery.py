"""Splitting long replies (Chinese and emoji too), keeping the typing indicator up, streaming by rate-limited edits."""

from __future__ import annotations

import asyncio
import html
import itertools
import re
import time

import pytest
import regex

from chatforge.delivery import RetryAfter, StreamingReply, keep_typing, split_message, utf16_length

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


# ---------------------------------------------------------------- Chinese, Japanese, emoji: never a half character

FAMILY, FLAG, THUMB, KEYCAP = "👨\u200d👩\u200d👧\u200d👦", "🇨🇳", "👍🏽", "1\ufe0f\u20e3"
E_ACUTE, HANGUL = "e\u0301", "\u1100\u1161\u11a8"  # é as e + combining acute; 각 as three conjoining jamo
SCOTLAND = "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # a tag sequence: 14 UTF-16 units
CLUSTERS = [FAMILY, FLAG, THUMB, KEYCAP, E_ACUTE, HANGUL, SCOTLAND, "😀", "中"]

SENTENCES = [
    "今天天气很好，我们去公园散步吧。", "你吃过晚饭了吗？", "太好了！",
    "这个周末我打算去图书馆看书，顺便借几本关于历史的书。",
    "他笑着说：“明天见。”", "春天来了，花都开了🌸，孩子们在草地上奔跑。",
    "人工智能正在改变我们的工作方式、学习方式和生活方式；但是，我们也需要认真思考它带来的风险。",
    f"全家人一起吃饭{FAMILY}，是最幸福的时刻。", f"我为中国队加油{FLAG}！", f"做得好{THUMB}，继续努力。",
    f"第{KEYCAP}步：打开设置；第2\ufe0f\u20e3步：选择语言。", f"我喜欢这家cafe\u0301的咖啡☕。",
    "「ありがとう」と彼女は言った。", "今日はいい天気ですね😀。", "请把文件发给我，我下午会仔细检查一遍。",
]
SENTENCE_END = regex.compile(r"[。！？][”’」』）》】]*$")


def chinese(chars: int, sentences_per_paragraph: int | None = None) -> str:
    """Real sentences (Chinese, some Japanese, emoji) until `chars` code points; one paragraph unless asked."""
    out: list[str] = []
    size = 0
    for count, sentence in enumerate(itertools.cycle(SENTENCES), 1):
        out.append(sentence)
        size += len(sentence)
        if size >= chars:
            break
        if sentences_per_paragraph and count % sentences_per_paragraph == 0:
            out.append("\n\n")
    return "".join(out)


def boundaries(text: str) -> set[int]:
    """Where one user-perceived character (an extended grapheme cluster) ends and the next begins."""
    return {0} | {match.end() for match in regex.finditer(r"\X", text)}


def rejoin(parts: list[str], text: str) -> list[tuple[int, int]]:
    """Where each part sits in `text`; asserts they give back the text (only whitespace dropped at cuts)
    and that no part begins or ends inside a grapheme cluster."""
    cuts = boundaries(text)
    spans = []
    position = 0
    for part in parts:
        while position < len(text) and text[position].isspace():
            position += 1
        assert text.startswith(part, position), f"part {len(spans)} is not the text at {position}: {part[:30]!r}"
        start, position = position, position + len(part)
        assert start in cuts and position in cuts, f"part {len(spans)} cuts a character at {start}..{position}"
        spans.append((start, position))
    assert not text[position:].strip(), f"text lost after {position}: {text[position:position + 30]!r}"
    return spans


@pytest.mark.parametrize("limit", [2000, 4096])
def test_a_long_chinese_paragraph_is_cut_after_sentences_within_the_utf16_limit(limit):
    text = chinese(10_000)
    assert "\n" not in text and " " not in text and utf16_length(text) > len(text)
    parts = split_message(text, limit)
    rejoin(parts, text)
    assert len(parts) >= 10_000 // limit + 1
    assert all(utf16_length(part) <= limit for part in parts)
    assert all(SENTENCE_END.search(part) for part in parts[:-1]), [part[-12:] for part in parts]
    assert all(utf16_length(part) > limit - 60 for part in parts[:-1])  # sentences are short: parts are full


def test_a_chinese_reply_in_paragraphs_is_cut_between_paragraphs():
    text = chinese(10_000, sentences_per_paragraph=6)
    parts = split_message(text, 2000)
    rejoin(parts, text)
    paragraphs = text.split("\n\n")
    assert all(utf16_length(part) <= 2000 for part in parts)
    for part in parts:
        assert part.split("\n\n")[0] in paragraphs and part.split("\n\n")[-1] in paragraphs  # whole paragraphs


def test_without_sentence_ends_a_chinese_sentence_is_cut_after_a_clause():
    clauses = ["我们先讨论了价格问题", "然后又比较了几家公司的服务", "有人提到了交货时间", f"大家都很满意{THUMB}",
               "最后一致同意下周再开一次会"]
    text = "".join(clause + "，、；："[i % 4] for i, clause in enumerate(clauses * 60)) + "结束。"
    parts = split_message(text, 500)
    rejoin(parts, text)
    assert len(parts) >= 4 and all(utf16_length(part) <= 500 for part in parts)
    assert all(part[-1] in "，、；：" for part in parts[:-1]), [part[-8:] for part in parts]


def test_a_run_without_punctuation_is_cut_between_graphemes_as_full_as_possible():
    text = "".join(f"中文没有空格{cluster}" for cluster in CLUSTERS) * 80
    parts = split_message(text, 2000)
    rejoin(parts, text)
    widest = max(utf16_length(cluster) for cluster in CLUSTERS)
    assert all(2000 - widest < utf16_length(part) <= 2000 for part in parts[:-1])


@pytest.mark.parametrize("limit, measure", [(2000, utf16_length), (4096, utf16_length), (2000, len)],
                         ids=["discord", "telegram", "code-points"])
@pytest.mark.parametrize("cluster", CLUSTERS, ids=["family", "flag", "skin-tone", "keycap", "e-acute", "jamo",
                                                    "tag-flag", "emoji", "han"])
def test_a_character_straddling_the_limit_moves_whole_to_the_next_part(limit, measure, cluster):
    width = measure(cluster)
    for before in range(limit - width - 1, limit + 1):  # ends one unit short, exactly at, and over the limit
        text = "中" * before + cluster + "文" * 50
        parts = split_message(text, limit, measure)
        room = limit - before - width  # what is left for 文 (one unit each) after the cluster, if it fits
        assert parts[0] == ("中" * before + cluster + "文" * room if room >= 0 else "中" * before), (before, width)
        assert "".join(parts) == text and all(measure(part) <= limit for part in parts)


def test_the_default_measure_is_utf16_the_stricter_count():
    """Discord counts code points and Telegram UTF-16 code units: by default a part fits both."""
    parts = split_message("😀" * 1500, 2000)
    assert [len(part) for part in parts] == [1000, 500]
    assert utf16_length("a😀中" + FAMILY) == 1 + 2 + 1 + 11


def test_a_lone_surrogate_is_measured_not_a_traceback():
    assert utf16_length("ab\ud83d") == 3
    assert "".join(split_message("字" * 50 + "\ud83d" + "字" * 50, 40)) == "字" * 50 + "\ud83d" + "字" * 50


def test_one_grapheme_wider_than_the_limit_is_still_cut_to_fit():
    text = "Z" + "\u0301" * 100 + "文" * 10  # one cluster of 101 code points ("zalgo" text)
    parts = split_message(text, 40)
    assert "".join(parts) == text and all(len(part) <= 40 for part in parts)


def test_chinese_sentence_ends_are_preferred_to_the_spaces_around_latin_words():
    text = "我们用 Python 写了一个聊天机器人，它可以在 Discord 和 Telegram 上回答问题。" * 60
    parts = split_message(text, 1000)
    rejoin(parts, text)
    assert all(part.endswith("回答问题。") for part in parts[:-1]), [part[-10:] for part in parts]


def test_latin_text_is_still_cut_at_spaces():
    text = " ".join(f"word{i}" for i in range(600))
    parts = split_message(text, 500)
    rejoin(parts, text)
    assert all(regex.fullmatch(r"word\d+( word\d+)*", part) for part in parts)
    assert all(len(part) > 480 for part in parts[:-1])


def test_a_streamed_reply_rolls_over_without_cutting_a_character():
    """Pieces arrive cut anywhere (a model's tokens); the previews past the limit and the final parts
    end between characters, and each fits the limit in UTF-16 code units (Telegram's count)."""
    text = chinese(700)
    chat = FakeChat()

    async def main():
        reply = StreamingReply(chat.send, chat.edit, interval=0.005, limit=100)
        for start in range(0, len(text), 3):  # 3 code points a piece: clusters are split across pieces
            reply.on_text(text[start:start + 3])
            await asyncio.sleep(0.001)
        return await reply.finish(text)

    rest = asyncio.run(asyncio.wait_for(main(), 20))
    shown = [shown for _, kind, shown in chat.events if kind in ("send", "edit")]
    assert all(utf16_length(preview) <= 100 for preview in shown)
    cut = [preview for preview in shown if preview.endswith("…") and not text.startswith(preview)]
    assert cut, "no preview went past the limit"
    cuts = boundaries(text)
    for preview in cut:
        assert text.startswith(preview[:-1]) and len(preview) - 1 in cuts, preview[-6:]
    parts = [shown[-1]] + rest
    rejoin(parts, text)
    assert all(utf16_length(part) <= 100 for part in parts)
    assert all(SENTENCE_END.search(part) for part in parts[:-1])


def test_a_streaming_limit_too_small_for_a_preview_is_refused_at_once():
    chat = FakeChat()
    with pytest.raises(ValueError, match="limit must be at least 41"):
        StreamingReply(chat.send, chat.edit, limit=40)
