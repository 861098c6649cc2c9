"""The summarize skill in Chinese and other languages: language detected per text, sentences ranked, never the input.

Every text here is real prose in its language; the summaries come from the real
splitters (our Chinese one, pysbd, the punctuation fallback), jieba and sumy.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chatforge.testing import FakeGenerator, make_bot

from test_summarize import PARAGRAPH as ENGLISH_PARAGRAPH
from test_summarize import SENTENCES as ENGLISH_SENTENCES

# Ten sentences about the future of AI. The first four are about the conference
# itself; the paragraph's terms (人工智能, 发展, 技术, 挑战) gather in sentences 5-9.
CHINESE_SENTENCES = [
    "上周末，我们在杭州参加了一场学术会议。",
    "会场设在西湖边的一家酒店里，来自各地的学者都到了。",
    "午饭之后，大家在湖边散步，聊起了各自的旅行见闻。",
    "下午的报告从一个问题开始：“机器真的能思考吗？”",
    "主讲人认为，人工智能的未来发展将取决于技术、数据和人才三个方面。",
    "他指出，大模型技术的发展让人工智能在语言理解上取得了突破，但也带来了能耗和安全方面的新挑战。",
    "人工智能的发展趋势是与各行各业深度融合，医疗、教育和交通都会因人工智能技术而改变……",
    "然而，数据隐私、算法偏见和就业冲击是人工智能未来发展必须面对的挑战。",
    "他建议，政府、企业和高校应当共同制定人工智能技术的发展规范，以应对这些挑战。",
    "会议在傍晚结束，很多人说这是一次难忘的经历。",
]
CHINESE_PARAGRAPH = "".join(CHINESE_SENTENCES)

JAPANESE_SENTENCES = [
    "先月、私たちは京都へ旅行に行きました。",
    "駅の近くのホテルに泊まり、朝ごはんがとてもおいしかったです。",
    "二日目は雨が降ったので、博物館でゆっくり過ごしました。",
    "そこで、ある研究者の講演を聞く機会がありました。",
    "講演のテーマは、再生可能エネルギーと地球温暖化の関係でした。",
    "研究者は、再生可能エネルギーの普及が地球温暖化を防ぐ鍵だと話しました。",
    "太陽光や風力などの再生可能エネルギーは、コストが下がり続けています。",
    "しかし、再生可能エネルギーを増やすには、電力を貯める技術の開発が必要です。",
    "地球温暖化を止めるために、政府と企業が再生可能エネルギーへの投資を増やすべきだと強調しました。",
    "夜は友達と一緒に鴨川のほとりを散歩しました。",
]

# Vietnamese: neither pysbd nor sumy has rules for it (no splitter, stemmer or stop words).
VIETNAMESE_SENTENCES = [
    "Hôm qua tôi đi chợ với mẹ vào buổi sáng.",
    "Trời hơi lạnh nên chúng tôi mặc áo ấm.",
    "Sau đó chúng tôi ghé quán phở quen thuộc.",
    "Ở quán, tôi gặp một người bạn cũ làm kỹ sư.",
    "Anh ấy kể về năng lượng mặt trời ở Việt Nam.",
    "Theo anh, năng lượng mặt trời đang phát triển nhanh ở Việt Nam.",
    "Nhiều tỉnh ở Việt Nam đã xây nhà máy năng lượng mặt trời lớn.",
    "Tuy nhiên, lưới điện chưa đủ mạnh để nhận hết năng lượng mặt trời.",
    "Anh tin rằng năng lượng mặt trời sẽ là tương lai của điện ở Việt Nam.",
    "Chúng tôi chào nhau rồi tôi về nhà.",
]


def pieces(summary: str, sentences: list[str], separator: str = "") -> list[str]:
    """The summary cut back into sentences of the text; fails if any part of it is not one of them."""
    picked, rest = [], summary
    for _ in range(len(sentences) + 1):  # bounded: at most one step per sentence of the text
        rest = rest.removeprefix(separator) if picked else rest
        if not rest:
            return picked
        match = max((s for s in sentences if rest.startswith(s)), key=len, default=None)
        assert match is not None, f"not a sentence of the text: {rest!r} (summary {summary!r})"
        picked.append(match)
        rest = rest[len(match):]
    raise AssertionError(f"summary longer than the text: {summary!r}")


def assert_ranked(picked: list[str], sentences: list[str], count: int) -> None:
    assert len(picked) == count
    assert picked == sorted(picked, key=sentences.index), "kept in the text's order"
    assert picked != sentences[:count], f"just the first {count} sentences: {picked}"


# ------------------------------------------------------------------ Chinese through /summarize

@pytest.mark.parametrize("algorithm", ["lexrank", "textrank"])
def test_a_chinese_paragraph_gives_its_central_sentences_not_its_first(algorithm):
    bot = make_bot({"plugins": {"summarize": {"algorithm": algorithm}}})
    summary = bot.ask(f"/summarize {CHINESE_PARAGRAPH}")
    picked = pieces(summary, CHINESE_SENTENCES)  # joined without spaces
    assert_ranked(picked, CHINESE_SENTENCES, 3)
    about_ai = [s for s in picked if "人工智能" in s]
    assert len(about_ai) >= 2, picked


def test_chinese_sentence_count_and_ratio():
    one = make_bot({"plugins": {"summarize": {"sentences": 1}}})
    [best] = pieces(one.ask(f"/summarize {CHINESE_PARAGRAPH}"), CHINESE_SENTENCES)
    assert "人工智能" in best
    half = make_bot({"plugins": {"summarize": {"ratio": 0.5}}})
    assert len(pieces(half.ask(f"/summarize {CHINESE_PARAGRAPH}"), CHINESE_SENTENCES)) == 5


def test_chinese_by_name_or_code_and_through_the_trigger():
    for language in ("chinese", "zh", "zho"):
        bot = make_bot({"plugins": {"summarize": {"language": language, "sentences": 2}}})
        assert_ranked(pieces(bot.ask(f"/summarize {CHINESE_PARAGRAPH}"), CHINESE_SENTENCES), CHINESE_SENTENCES, 2)
    bot = make_bot({"plugins": {"summarize": {"sentences": 2}}})
    assert_ranked(pieces(bot.ask(f"summarize: {CHINESE_PARAGRAPH}"), CHINESE_SENTENCES), CHINESE_SENTENCES, 2)


def test_auto_detects_each_texts_language_with_the_same_config():
    bot = make_bot()  # language: auto is the default
    chinese = bot.ask(f"/summarize {CHINESE_PARAGRAPH}")
    english = bot.ask(f"/summarize {ENGLISH_PARAGRAPH}")
    assert_ranked(pieces(chinese, CHINESE_SENTENCES), CHINESE_SENTENCES, 3)
    assert len(pieces(english, ENGLISH_SENTENCES, separator=" ")) == 3


def test_a_text_with_nothing_to_detect_falls_back_to_english_rules():
    from chatforge.plugins.summarize import SummarizeConfig, language_for

    sums = ["1 + 1 = 2.", "2 + 2 = 4.", "3 + 3 = 6.", "4 + 4 = 8."]
    assert language_for(" ".join(sums), SummarizeConfig()) == "english"
    assert language_for(CHINESE_PARAGRAPH, SummarizeConfig()) == "zho"
    assert language_for(CHINESE_PARAGRAPH, SummarizeConfig(language="German")) == "German"
    assert len(pieces(make_bot().ask("/summarize " + " ".join(sums)), sums, separator=" ")) == 3


def test_mixed_chinese_and_english_is_summarized_as_chinese():
    sentences = [
        "今天我们讨论 Python 的历史。",
        "会议室里很冷，大家都穿着外套。",
        "Python 语言由 Guido van Rossum 在 1991 年发布。",
        "如今 Python 3.12 是数据科学和人工智能领域最常用的语言之一！",
        "很多大学用 Python 教授编程入门课程。",
        "午饭是饺子和面条。",
    ]
    bot = make_bot({"plugins": {"summarize": {"sentences": 2}}})
    picked = pieces(bot.ask("/summarize " + "".join(sentences)), sentences)
    assert len(picked) == 2 and all("Python" in s for s in picked), picked


# ------------------------------------------------------------------ splitting Chinese

@pytest.fixture(scope="module")
def chinese():
    from chatforge.plugins.summarize import ExtractiveSummarizer

    return ExtractiveSummarizer("lexrank", "chinese")


@pytest.mark.parametrize("text, expected", [
    ("他说：“我们走吧！”然后离开了。", ["他说：“我们走吧！”", "然后离开了。"]),
    ("她问：「你来吗？」我说：『来。』好。", ["她问：「你来吗？」", "我说：『来。』", "好。"]),
    ("（这是括号里的话。）最后一句。", ["（这是括号里的话。）", "最后一句。"]),
    ("天气很好……我们出去玩吧？好的。", ["天气很好……", "我们出去玩吧？", "好的。"]),
    ("你真的来了？！太好了！！", ["你真的来了？！", "太好了！！"]),
    ("春天来了；花开了，草绿了。", ["春天来了；花开了，草绿了。"]),  # ；joins clauses of one sentence
    ("价格是3.5元，增长了12.8%。网址是www.example.com。", ["价格是3.5元，增长了12.8%。", "网址是www.example.com。"]),
    ("GPT-4很强大! 真的吗?是的。This is English. 版本3.5发布了。",
     ["GPT-4很强大!", "真的吗?", "是的。", "This is English.", "版本3.5发布了。"]),
    ("第一行没有标点\n第二行也没有\n\n第三行。", ["第一行没有标点", "第二行也没有", "第三行。"]),
    ("结尾没有标点", ["结尾没有标点"]),
])
def test_chinese_sentences_split(chinese, text, expected):
    assert chinese.split(text) == expected


def test_jieba_is_loaded_on_first_use_and_quietly():
    """In a fresh interpreter, where jieba's first load would print "Building prefix dict ..."."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from chatforge.testing import make_bot\n"
        "import chatforge.plugins.summarize\n"
        "assert 'jieba' not in sys.modules, 'jieba imported with the plugin'\n"
        f"print(make_bot().ask('/summarize ' + {CHINESE_PARAGRAPH!r}))\n"
        "assert 'jieba' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "人工智能" in result.stdout
    assert "prefix dict" not in result.stderr and "pkg_resources" not in result.stderr, result.stderr


# ------------------------------------------------------------------ other languages

def test_japanese_is_ranked_too():
    bot = make_bot()
    picked = pieces(bot.ask("/summarize " + "".join(JAPANESE_SENTENCES)), JAPANESE_SENTENCES)
    assert_ranked(picked, JAPANESE_SENTENCES, 3)
    assert sum("再生可能エネルギー" in s for s in picked) >= 2, picked


GERMAN_SENTENCES = [
    "Am Samstag fuhren wir mit dem Zug nach Hamburg.",
    "Das Wetter war kalt, aber sonnig.",
    "Im Hotel gab es ein gutes Frühstück mit frischen Brötchen.",
    "Am Nachmittag besuchten wir einen Vortrag im Rathaus.",
    "Die Rednerin sprach über erneuerbare Energien und den Klimaschutz.",
    "Sie erklärte, dass erneuerbare Energien für den Klimaschutz in Deutschland entscheidend sind.",
    "Windkraft und Solarenergie sind die wichtigsten erneuerbaren Energien in Deutschland.",
    "Für den Klimaschutz braucht Deutschland aber auch bessere Stromnetze für die erneuerbaren Energien.",
    "Am Abend aßen wir Fisch am Hafen.",
]


def test_german_keeps_pysbd_and_sumys_stemmer_and_stop_words():
    from chatforge.plugins.summarize import ExtractiveSummarizer

    german = ExtractiveSummarizer("lexrank", "deu")
    assert german.rules.splitter == "pysbd" and german.summarizer.stop_words  # sumy's German list
    assert german.summarizer.stem_word("Energien") == german.summarizer.stem_word("energie")
    picked = pieces(make_bot().ask("/summarize " + " ".join(GERMAN_SENTENCES)), GERMAN_SENTENCES, separator=" ")
    assert_ranked(picked, GERMAN_SENTENCES, 3)
    assert sum("Energien" in s for s in picked) >= 2, picked


def test_a_language_without_rules_is_split_at_punctuation_and_ranked():
    bot = make_bot()
    picked = pieces(bot.ask("/summarize " + " ".join(VIETNAMESE_SENTENCES)), VIETNAMESE_SENTENCES, separator=" ")
    assert_ranked(picked, VIETNAMESE_SENTENCES, 3)
    assert sum("năng lượng mặt trời" in s for s in picked) >= 2, picked


def test_a_text_that_cannot_be_split_says_so():
    thai = ("วันนี้อากาศดีมาก เราไปเดินเล่นที่สวนสาธารณะกับเพื่อน ๆ แล้วกินข้าวเที่ยงที่ร้านอาหารริมแม่น้ำ "
            "ตอนเย็นเรากลับบ้านและดูหนังด้วยกัน")
    reply = make_bot().ask(f"/summarize {thai}")
    assert thai not in reply
    assert reply.startswith("I can find only one sentence in that text"), reply


# ------------------------------------------------------------------ never the input

@pytest.mark.parametrize("text, count", [
    ("人工智能正在改变世界。它也带来了新的挑战。", 2),
    ("The park is planned. The council agrees. It opens in May.", 3),
])
def test_a_text_no_longer_than_the_summary_is_refused_not_returned(text, count):
    reply = make_bot().ask(f"/summarize {text}")
    assert text not in reply
    assert reply == (f"That text is already short: {count} sentences, and a summary keeps 3, "
                     f"so there is nothing to leave out.")


def test_a_single_sentence_is_refused_not_returned():
    text = "人工智能的未来发展充满挑战"
    reply = make_bot().ask(f"/summarize {text}")
    assert text not in reply and reply.startswith("I can find only one sentence in that text")


# ------------------------------------------------------------------ the conversation

def test_a_chinese_conversation_is_summarized_in_chinese_sentences():
    replies = iter(["好的，我记住了", "明白了，故宫和长城都很值得去", "五千元应该够用了"])
    bot = make_bot(generator=FakeGenerator(lambda history, text: next(replies)))
    lines = ["我下个月要去北京旅行", "我想去看故宫和长城", "我去北京旅行的预算是五千元"]
    for line in lines:
        bot.ask(line)
    summary = bot.ask("/summarize")
    assert summary.startswith("Our conversation so far, in short: ")
    body = summary.removeprefix("Our conversation so far, in short: ")
    spoken = [f"{line}。" for line in lines] + ["好的，我记住了。", "明白了，故宫和长城都很值得去。", "五千元应该够用了。"]
    picked = pieces(body, spoken)
    assert len(picked) == 3 and "." not in body


def test_a_short_conversation_says_so():
    bot = make_bot(generator=FakeGenerator(lambda history, text: "好的"))
    bot.ask("我下个月要去北京旅行")
    reply = bot.ask("/summarize")
    assert reply == "Our conversation is still short: 2 sentences so far, and a summary keeps 3."


def test_conversation_lines_end_in_their_own_script():
    from chatforge.plugins.summarize import conversation_text

    turns = [SimpleNamespace(text=text) for text in
             ["我们去北京", "真的吗？", "他说：“好。”", "Sounds good", "Really?!", "ありがとう", "  "]]
    assert conversation_text(turns).splitlines() == [
        "我们去北京。", "真的吗？", "他说：“好。”", "Sounds good.", "Really?!", "ありがとう。"]
