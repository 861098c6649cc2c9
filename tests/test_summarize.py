"""The summarize skill: extractive for real, the generator and a tiny BART for the model backends."""

from __future__ import annotations

import asyncio

import pytest

from chatforge.testing import FakeGenerator, make_bot

from conftest import train_byte_bpe  # noqa: E402

PARAGRAPH = (
    "The city council met on Monday to discuss the new park. "
    "Residents had asked for more green space for years. "
    "The proposed park would cover twelve acres near the river. "
    "It would include a playground, walking trails and a community garden. "
    "Funding for the park would come from a state grant and local taxes. "
    "Some council members worried about the park's maintenance costs. "
    "Others argued that the park would raise property values. "
    "A public hearing on the park is scheduled for next month. "
    "The mayor said she supports the park plan. "
    "Construction could begin as early as next spring."
)
SENTENCES = [s.strip() for s in PARAGRAPH.replace(". ", ".\n").splitlines()]


def ask(bot, text):
    return bot.ask(text)


def chosen_sentences(summary: str) -> list[str]:
    return [s.strip() for s in summary.replace(". ", ".\n").splitlines() if s.strip()]


@pytest.mark.parametrize("language", ["auto", "english", "en"])
@pytest.mark.parametrize("algorithm", ["lexrank", "textrank"])
def test_a_ten_sentence_paragraph_gives_three_of_its_sentences(algorithm, language):
    bot = make_bot({"plugins": {"summarize": {"algorithm": algorithm, "language": language}}})
    picked = chosen_sentences(ask(bot, f"/summarize {PARAGRAPH}"))
    assert len(picked) == 3
    assert all(sentence in SENTENCES for sentence in picked)
    assert picked == sorted(picked, key=SENTENCES.index)  # kept in the text's order


def test_sentence_count_and_ratio_from_config():
    two = make_bot({"plugins": {"summarize": {"sentences": 2}}})
    assert len(chosen_sentences(ask(two, f"/summarize {PARAGRAPH}"))) == 2
    half = make_bot({"plugins": {"summarize": {"ratio": 0.5}}})
    assert len(chosen_sentences(ask(half, f"/summarize {PARAGRAPH}"))) == 5


def test_textrank_prefers_the_sentences_that_share_the_most():
    """The sentence about an unrelated topic is never the summary."""
    text = ("Cats sleep most of the day. Cats hunt mice at night. "
            "A cat sleeps more than a dog. The stock market fell sharply on Tuesday.")
    bot = make_bot({"plugins": {"summarize": {"sentences": 1, "algorithm": "textrank"}}})
    assert "stock market" not in ask(bot, f"/summarize {text}")


def test_summarize_the_conversation_from_memory():
    bot = make_bot(generator=FakeGenerator(lambda history, text: "Noted."))
    assert ask(bot, "/summarize").startswith("There is nothing to summarize yet.")
    for line in ["I am planning a trip to Japan in April", "I want to see temples in Kyoto",
                 "My budget for the trip to Japan is two thousand dollars"]:
        ask(bot, line)
    summary = ask(bot, "/summarize")
    assert summary.startswith("Our conversation so far, in short: ")
    body = summary.removeprefix("Our conversation so far, in short: ")
    assert "Japan" in body and len(chosen_sentences(body)) == 3


def test_trigger_and_length_limit():
    bot = make_bot({"plugins": {"summarize": {"max_chars": 2000, "sentences": 1}}})
    assert chosen_sentences(ask(bot, f"summarize: {PARAGRAPH}"))[0] in SENTENCES
    assert chosen_sentences(ask(bot, f"TL;DR: {PARAGRAPH}"))[0] in SENTENCES
    assert ask(bot, "/summarize " + "word " * 500) == (
        "That text is 2,499 characters long; the limit is 2,000. Please send a shorter one.")


def test_generator_backend_asks_the_language_model():
    generator = FakeGenerator(lambda history, text: "A park is planned.")
    bot = make_bot({"plugins": {"summarize": {"backend": "generator", "sentences": 2}}}, generator=generator)
    assert ask(bot, f"/summarize {PARAGRAPH}") == "A park is planned."
    history, instruction = generator.calls[-1]
    assert history == [] and instruction.startswith("Summarize the following text in at most 2 sentences.")
    assert PARAGRAPH in instruction


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A one-layer BART with random weights and a byte-level BPE trained here."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bart")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = BartTokenizerFast(tokenizer_object=train_byte_bpe(specials), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_transformers_backend_loads_a_seq2seq_model_once(tiny_bart, monkeypatch):
    from chatforge.plugins import summarize

    loads = []
    original = summarize.Seq2SeqSummarizer.__init__

    def counting_init(self, model):
        loads.append(model)
        original(self, model)

    monkeypatch.setattr(summarize.Seq2SeqSummarizer, "__init__", counting_init)
    summarize.backend_for.cache_clear()
    bot = make_bot({"plugins": {"summarize": {"backend": "transformers", "model": str(tiny_bart),
                                              "max_new_tokens": 8}}})
    first = ask(bot, f"/summarize {PARAGRAPH}")
    second = ask(bot, f"/summarize {PARAGRAPH}")
    assert isinstance(first, str) and first == second  # greedy decoding is deterministic
    assert loads == [str(tiny_bart)]
    summarize.backend_for.cache_clear()


def test_transformers_backend_offline_default_says_what_to_do():
    from chatforge.plugins import summarize

    summarize.backend_for.cache_clear()
    reply = ask(make_bot({"plugins": {"summarize": {"backend": "transformers"}}}), f"/summarize {PARAGRAPH}")
    assert "sshleifer/distilbart-cnn-12-6" in reply and "plugins.summarize.model" in reply
    summarize.backend_for.cache_clear()


def test_a_model_that_gives_the_text_back_is_not_taken_for_a_summary():
    generator = FakeGenerator(lambda history, text: "  " + text.split("\n\n", 1)[1] + "\n")
    bot = make_bot({"plugins": {"summarize": {"backend": "generator"}}}, generator=generator)
    reply = ask(bot, f"/summarize {PARAGRAPH}")
    assert PARAGRAPH not in reply
    assert reply == "The model gave the text back unchanged instead of a summary; try backend: extractive."


def test_the_transformers_backend_giving_the_text_back_is_refused(tiny_bart, monkeypatch):
    from chatforge.plugins import summarize

    monkeypatch.setattr(summarize.Seq2SeqSummarizer, "summarize", lambda self, text, max_new_tokens: text)
    summarize.backend_for.cache_clear()
    bot = make_bot({"plugins": {"summarize": {"backend": "transformers", "model": str(tiny_bart)}}})
    assert ask(bot, f"/summarize {PARAGRAPH}") == (
        "The model gave the text back unchanged instead of a summary; try backend: extractive.")
    summarize.backend_for.cache_clear()


def test_an_unknown_language_name_is_a_config_error():
    from chatforge.config import ConfigError

    with pytest.raises(ConfigError) as error:
        make_bot({"plugins": {"summarize": {"language": "elvish-ish"}}})
    assert ('plugins.summarize.language: must be "auto", a language\'s English name such as "chinese", '
            'or an ISO 639 code such as "zh", got "elvish-ish"') in str(error.value)


OFF_TOPIC_OPENING = [
    "Last weekend we travelled to Boston for a conference.",
    "The hotel was near the harbour and the breakfast was good.",
    "After lunch we walked along the river and talked about our holidays.",
    "The afternoon talk began with a question: can machines think?",
    "The speaker said that the future of artificial intelligence depends on technology, data and people.",
    "He said that large model technology has moved artificial intelligence forward, "
    "but brings new challenges of energy and safety.",
    "Artificial intelligence technology will change medicine, schools and transport.",
    "Yet privacy, bias and jobs are challenges that the future of artificial intelligence must face.",
    "He proposed that governments and universities write rules for artificial intelligence technology "
    "to meet these challenges.",
    "The conference ended in the evening, and many said it was a day to remember.",
]


def test_lexrank_does_not_give_back_an_off_topic_opening():
    """sumy's own LexRank tied every sentence here and so answered the first three."""
    bot = make_bot({"plugins": {"summarize": {"algorithm": "lexrank"}}})
    picked = chosen_sentences(ask(bot, "/summarize " + " ".join(OFF_TOPIC_OPENING)))
    assert len(picked) == 3 and all(sentence in OFF_TOPIC_OPENING for sentence in picked)
    assert all("intelligence" in sentence for sentence in picked), picked


@pytest.mark.parametrize("algorithm", ["lexrank", "textrank"])
def test_sentences_with_no_word_in_common_are_not_ranked_by_position(algorithm):
    bot = make_bot({"plugins": {"summarize": {"algorithm": algorithm}}})
    for text in ("Cats sleep all day. Trains run fast. Apples are red. Rain fell in Paris.",
                 "今天下雨。我喜欢猫。火车很快。苹果是红色的。"):
        assert ask(bot, f"/summarize {text}") == (
            "No two sentences of that text share a word, so I can't tell which of them carry the most of it.")
