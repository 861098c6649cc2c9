"""The summarize skill in Chinese and other languages: language detected per text, sentences ranked, never the input.

Every text here is real prose in its language; the summaries come from the real
splitters (our Chinese one, pysbd, the punctuation fallback), jieba and sumy.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from chatforge.testing import FakeGenerator, make_bot

from test_summarize import OFF_TOPIC_OPENING
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

# The same ten sentences in Traditional characters and Taiwan's words (人工智慧, 資料, 演算法).
TRADITIONAL_SENTENCES = [
    "上週末，我們在杭州參加了一場學術會議。",
    "會場設在西湖邊的一家酒店裡，來自各地的學者都到了。",
    "午飯之後，大家在湖邊散步，聊起了各自的旅行見聞。",
    "下午的報告從一個問題開始：「機器真的能思考嗎？」",
    "主講人認為，人工智慧的未來發展將取決於技術、資料和人才三個方面。",
    "他指出，大模型技術的發展讓人工智慧在語言理解上取得了突破，但也帶來了能耗和安全方面的新挑戰。",
    "人工智慧的發展趨勢是與各行各業深度融合，醫療、教育和交通都會因人工智慧技術而改變……",
    "然而，資料隱私、演算法偏見和就業衝擊是人工智慧未來發展必須面對的挑戰。",
    "他建議，政府、企業和高校應當共同制定人工智慧技術的發展規範，以因應這些挑戰。",
    "會議在傍晚結束，很多人說這是一次難忘的經歷。",
]

# A diary with 我們 in half its sentences: sumy's stop words, all Simplified, do not know 我們 (我们 is one).
TRADITIONAL_DIARY = [
    "上週末天氣很好。", "我們去了公園散步。", "人工智慧正在深刻改變我們的生活。", "人工智慧的發展離不開大量的資料。",
    "資料和演算法共同推動人工智慧的進步。", "午飯我們吃了麵條。", "人工智慧也帶來了隱私和安全的挑戰。",
    "下午我們去看了電影。", "如何治理人工智慧是各國共同面對的問題。", "晚上我們早早睡了。",
]

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


# Arabic: pysbd's splitter, sumy's stop words and nltk's Arabic stemmer.
ARABIC_SENTENCES = [
    "ذهبنا يوم السبت إلى المدينة بالقطار.",
    "كان الطقس باردا لكنه مشمس.",
    "في الفندق تناولنا فطورا لذيذا.",
    "بعد الظهر حضرنا محاضرة في الجامعة.",
    "تحدثت المحاضرة عن الطاقة المتجددة وحماية البيئة.",
    "وقالت إن الطاقة المتجددة ضرورية لحماية البيئة في بلادنا.",
    "الطاقة الشمسية وطاقة الرياح هي أهم مصادر الطاقة المتجددة.",
    "لكن حماية البيئة تحتاج أيضا إلى شبكات كهرباء أفضل للطاقة المتجددة.",
    "في المساء أكلنا السمك قرب الميناء.",
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


def cut(summary: str, sentences: list[str]) -> list[tuple[str, str]]:
    """The summary as (sentence of the text, the spacing after it); fails if any part of it is not a sentence."""
    picked, rest = [], summary
    for _ in range(len(sentences) + 1):  # bounded: at most one step per sentence of the text
        if not rest:
            return picked
        match = max((s for s in sentences if rest.startswith(s)), key=len, default=None)
        assert match is not None, f"not a sentence of the text: {rest!r} (summary {summary!r})"
        rest = rest[len(match):]
        gap = rest[:len(rest) - len(rest.lstrip())]
        picked.append((match, gap))
        rest = rest[len(gap):]
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
    assert german.rules.splitter == "pysbd" and german.ranker().stop_words  # sumy's German list
    assert german.ranker().stem_word("Energien") == german.ranker().stem_word("energie")
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


# ------------------------------------------------------------------ Traditional Chinese

@pytest.mark.parametrize("sentences", [TRADITIONAL_SENTENCES, TRADITIONAL_DIARY], ids=["conference", "diary"])
def test_traditional_chinese_is_ranked_as_its_simplified_copy_and_answered_in_traditional(sentences):
    """sumy's Chinese stop words are Simplified, so in Traditional text 我們 was the word that linked sentences."""
    from snownlp import SnowNLP

    bot = make_bot()
    picked = pieces(bot.ask("/summarize " + "".join(sentences)), sentences)  # the Traditional sentences
    assert_ranked(picked, sentences, 3)
    assert all("人工智慧" in s for s in picked), picked
    simplified = [SnowNLP(s).han for s in sentences]
    assert simplified != sentences
    as_simplified = pieces(bot.ask("/summarize " + "".join(simplified)), simplified)
    assert [sentences.index(s) for s in picked] == [simplified.index(s) for s in as_simplified]


# ------------------------------------------------------------------ how a summary is put together

@pytest.mark.parametrize("lines", [
    ["人工智能", "机器学习", "深度学习", "人工智能与机器学习", "天气"],
    ["Apples and pears", "Trains", "Pears and plums", "Apples, pears and plums", "The weather in May"],
], ids=["chinese", "english"])
def test_lines_without_punctuation_stay_lines(lines):
    summary = make_bot().ask("/summarize " + "\n".join(lines))
    assert len(summary.splitlines()) == 3 and all(line in lines for line in summary.splitlines()), summary


MIXED = ("我今天学习了Python。Python is a popular language. 我觉得Python很有用。Then I had lunch. "
         "下午我用Python写了一个机器人。The bot speaks Chinese.")
MIXED_SENTENCES = ["我今天学习了Python。", "Python is a popular language.", "我觉得Python很有用。", "Then I had lunch.",
                   "下午我用Python写了一个机器人。", "The bot speaks Chinese."]


def test_a_space_follows_a_sentence_in_latin_script_and_none_a_chinese_one():
    picked = cut(make_bot().ask(f"/summarize {MIXED}"), MIXED_SENTENCES)
    assert len(picked) == 3, picked
    expected = [" " if sentence.endswith(".") else "" for sentence, _ in picked[:-1]] + [""]
    assert [gap for _, gap in picked] == expected, picked
    assert " " in expected, f"no sentence in Latin script inside the summary: {picked}"


# ------------------------------------------------------------------ at the same time

def test_arabic_is_ranked_with_its_stemmer():
    from chatforge.plugins.summarize import ExtractiveSummarizer

    arabic = ExtractiveSummarizer("lexrank", "arabic")
    assert arabic.rules.splitter == "pysbd" and arabic.ranker().stop_words
    assert arabic.ranker().stem_word("للطاقة") == arabic.ranker().stem_word("الطاقة")
    picked = pieces(make_bot().ask("/summarize " + " ".join(ARABIC_SENTENCES)), ARABIC_SENTENCES, separator=" ")
    assert_ranked(picked, ARABIC_SENTENCES, 3)
    assert sum("الطاقة المتجددة" in s for s in picked) >= 2, picked


def test_arabic_words_are_stemmed_alike_in_threads_at_once():
    """nltk's ArabicStemmer keeps the word it is stemming on itself (is_noun, is_verb...), so threads that
    share one stem each other's words."""
    from chatforge.plugins.summarize import ExtractiveSummarizer

    arabic = ExtractiveSummarizer("lexrank", "arabic")
    alone = arabic.words(ARABIC_SENTENCES)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns every microsecond, so a race shows in a few rounds
    try:
        with ThreadPoolExecutor(8) as pool:
            for round_ in range(10):
                futures = [pool.submit(arabic.words, ARABIC_SENTENCES) for _ in range(8)]
                differing = sum(future.result(timeout=60) != alone for future in futures)
                assert differing == 0, f"round {round_}: {differing} of 8 threads stemmed differently"
    finally:
        sys.setswitchinterval(previous)


def test_texts_summarized_at_the_same_time_get_the_summaries_they_get_alone():
    """pysbd's Segmenter keeps the text it splits on itself: one per language, shared by the worker threads,
    looked for one text's sentences in another and lost them."""
    from chatforge.plugins.summarize import SummarizeConfig, summarize

    config = SummarizeConfig()
    texts = [ENGLISH_PARAGRAPH, " ".join(OFF_TOPIC_OPENING), " ".join(GERMAN_SENTENCES),
             " ".join(ARABIC_SENTENCES), CHINESE_PARAGRAPH, "".join(TRADITIONAL_SENTENCES), MIXED]

    async def at_once() -> list:
        return await asyncio.gather(*[summarize(text, config, None) for text in texts * 4], return_exceptions=True)

    async def main() -> None:
        alone = [await summarize(text, config, None) for text in texts]
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # threads take turns often, so a race shows in a few rounds
        try:
            for round_ in range(3):
                together = await asyncio.wait_for(at_once(), timeout=120)
                wrong = [(text[:30], got) for text, got in zip(texts * 4, together) if got != alone[texts.index(text)]]
                assert not wrong, f"round {round_}: {len(wrong)} of {len(together)} summaries differ: {wrong[:3]}"
        finally:
            sys.setswitchinterval(previous)

    asyncio.run(main())
