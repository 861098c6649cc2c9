"""The translate skill: the real Apertium program, a tiny MarianMT built here, langid, the triggers."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from chatforge.config import ConfigError
from chatforge.plugins import translate
from chatforge.testing import make_bot

needs_apertium = pytest.mark.skipif(shutil.which("apertium") is None,
                                    reason="the apertium program is not installed (apt-get install apertium apertium-eng-spa)")


FRENCH = "Bonjour, je voudrais un café, s'il vous plaît. Merci beaucoup."  # long enough for langid


def run(coro):
    return asyncio.run(coro)


def ask(text: str, config: dict | None = None) -> str | None:
    return make_bot({"plugins": {"translate": config or {}}}).ask(text)


@pytest.fixture(autouse=True)
def fresh_backends():
    """Backends are cached for the process; each test starts without them (and leaves none behind)."""
    translate.backend_for.cache_clear()
    yield
    translate.backend_for.cache_clear()


# ---------------------------------------------------------------- without a backend

def test_apertium_mode_names_become_iso639_3_pairs():
    listing = "  en-gl\n  eo-en\n  eng-spa\n  spa-eng_US\n  spa-eng\n  oci_aran-cat\n  eng-spa-tagger\n  xx-yy\n"
    assert translate.parse_apertium_modes(listing) == {
        ("eng", "glg"): "en-gl",
        ("epo", "eng"): "eo-en",
        ("eng", "spa"): "eng-spa",
        ("spa", "eng"): "spa-eng",  # the plain mode wins over spa-eng_US
        ("oci", "cat"): "oci_aran-cat",  # a variant is used when it is the only mode
    }


def test_languages_are_codes_or_english_names():
    assert [translate.iso639_3(word) for word in ("es", "spa", "Spanish", "spanish", "EN", "fre")] == [
        "spa", "spa", "spa", "spa", "eng", "fra"]
    assert translate.iso639_3("xx") is None
    assert translate.iso639_3("in") is None  # a deprecated code, and a word in "how do you say X in Y"


def test_empty_arguments_get_the_usage():
    assert ask("/translate") == "Usage: /translate [SRC>]TGT TEXT, e.g. /translate es Hello or /translate spa>eng Hola"
    assert ask("/translate es").startswith("Usage: /translate [SRC>]TGT TEXT")


def test_help_shows_the_usage_and_one_line():
    assert "/translate [SRC>]TGT TEXT - translate text into another language" in ask("/help")


def test_a_too_long_text_is_refused_before_translating():
    assert ask("/translate es " + "word " * 10, {"max_chars": 20}) == (
        "That text is 49 characters long; the limit is 20. Please send a shorter one.")
    assert ask("translate to Spanish: " + "word " * 10, {"max_chars": 20}).startswith("That text is 49 characters long")


def test_a_trigger_that_names_no_language_is_left_to_the_model():
    assert ask("translate into a poem: roses are red") == "echo: translate into a poem: roses are red"


def test_a_missing_apertium_program_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    reply = ask("/translate es Hello")
    assert "apt-get install apertium apertium-eng-spa" in reply
    assert "backend: transformers" in reply


def test_bad_pair_names_in_models_are_config_errors():
    with pytest.raises(ConfigError, match="not a language pair"):
        make_bot({"plugins": {"translate": {"models": {"english-xx": "/somewhere"}}}})


# ---------------------------------------------------------------- apertium

@needs_apertium
def test_apertium_translates_english_into_spanish():
    reply = ask("/translate es Hello, how are you?")
    assert "Hola" in reply
    assert reply != "Hello, how are you?"


@needs_apertium
def test_apertium_with_an_explicit_source_and_three_letter_codes():
    assert "Hello" in ask("/translate spa>eng Hola")
    assert "Hello" in ask("/translate Spanish>English Hola")


@needs_apertium
def test_the_source_language_is_found_when_not_given():
    reply = ask("/translate en Hola, ¿cómo estás?")
    assert "Hello" in reply and "how" in reply


@needs_apertium
def test_apertium_doubled_spaces_are_collapsed():
    reply = ask("/translate es The cat is on the table.  It is   black.")
    assert "gato" in reply and "  " not in reply


@needs_apertium
def test_an_unknown_language_lists_the_installed_pairs():
    reply = ask("/translate xx hello")
    assert reply.startswith("I can't translate into xx. Available pairs: ")
    assert "eng→spa" in reply and "spa→eng" in reply
    assert ask("/translate xx>es hello").startswith("I can't translate from xx. Available pairs: ")
    assert ask("/translate zu hello").startswith("I can't translate into Zulu. Available pairs: ")


@needs_apertium
def test_the_natural_language_triggers():
    assert "buenos" in ask("translate to Spanish: good morning").lower()
    assert "hola" in ask("translate into es: hello").lower()
    assert "buenos" in ask("how do you say 'good morning' in Spanish?").lower()
    assert "Hello" in ask("translate from Spanish to English: Hola")


@needs_apertium
def test_a_trigger_without_a_language_uses_the_default_target():
    config = {"triggers": [r"auf englisch:\s*(?P<text>.+)"], "default_target": "en"}
    assert "Hello" in ask("auf englisch: Hola", config)


ADD_ZHO_ENG = ("To add Chinese→English: hf download Helsinki-NLP/opus-mt-zh-en --local-dir models/opus-mt-zh-en, "
               "then set plugins.translate.models: {zho-eng: models/opus-mt-zh-en}.")


@needs_apertium
def test_a_detected_language_without_a_pair_is_named_with_the_pairs_and_how_to_add_one():
    """Issue 11: the source was guessed among the installed pairs only, so this came back unchanged.
    Issue 15: the refusal also says which config adds the pair."""
    assert ask("/translate en 人工智能的未来发展趋势与挑战") == (
        "That looks like Chinese, and I can't translate from Chinese into English. "
        f"Available pairs: eng→spa, spa→eng. {ADD_ZHO_ENG}")
    assert ask("/translate en 你好") == (
        "That looks like Chinese, and I can't translate from Chinese into English. "
        f"Available pairs: eng→spa, spa→eng. {ADD_ZHO_ENG}")


@needs_apertium
def test_a_target_no_pair_reaches_says_how_to_add_a_pair_into_it():
    assert ask("/translate zh Hello, how are you today? I am fine, thank you.") == (
        "I can't translate into Chinese. Available pairs: eng→spa, spa→eng. "
        "To add English→Chinese: hf download Helsinki-NLP/opus-mt-en-zh --local-dir models/opus-mt-en-zh, "
        "then set plugins.translate.models: {eng-zho: models/opus-mt-en-zh}.")
    # "Hello" alone is no language langid can place; English is the example then.
    assert ask("/translate zh Hello").endswith("then set plugins.translate.models: {eng-zho: models/opus-mt-en-zh}.")


@needs_apertium
def test_a_single_french_word_is_refused_naming_french_not_echoed():
    reply = ask("/translate en Bonjour")
    assert reply.startswith("I can't tell which language that is (perhaps ") and "French" in reply
    assert "name it: /translate SRC>eng TEXT" in reply


@needs_apertium
def test_an_unsure_guess_that_no_pair_covers_is_not_translated():
    """langid is unsure of two words; the only pair into English (spa→eng) knows none of them."""
    assert ask("/translate en Guten Morgen") == (
        "I can't tell which language that is (perhaps German or Dutch); name it: /translate SRC>eng TEXT. "
        "Available pairs: eng→spa, spa→eng.")


@needs_apertium
def test_french_is_not_returned_as_its_own_translation():
    """langid prefers English (79%) for this French: unsure, and Spanish→English knows none of its words."""
    reply = ask("/translate en Bonjour, comment allez-vous?")
    assert reply == ("I can't tell which language that is (perhaps English or French); name it: "
                     "/translate SRC>eng TEXT. Available pairs: eng→spa, spa→eng.")
    assert ask("/translate es Bonjour, comment allez-vous?").startswith("I can't tell which language that is")


@needs_apertium
def test_a_text_already_in_the_target_language_is_refused():
    assert ask("/translate en Hello, how are you?") == (
        "That already looks like English. If it is another language, name it: /translate SRC>eng TEXT.")


@needs_apertium
def test_short_texts_langid_cannot_place_still_translate_when_the_pair_knows_them():
    assert ask("/translate en Hola") == "Hello"
    assert ask("/translate es Hello") == "Hola"
    assert "Hello" in ask("/translate en Hola mundo")


@needs_apertium
def test_a_named_source_whose_words_apertium_does_not_know_is_refused():
    assert ask("/translate spa>eng Guten Morgen") == (
        "I couldn't translate that from Spanish into English: Guten, Morgen are not in my dictionary. "
        "Available pairs: eng→spa, spa→eng.")
    assert ask("/translate spa>eng Das ist ein sehr langer deutscher Satz mit vielen Wörtern, die keiner kennt.").startswith(
        "I couldn't translate that from Spanish into English: ist, ein, sehr, langer, deutscher and 7 more are not in")


@needs_apertium
def test_apertium_unknown_word_marks_are_removed_and_the_users_asterisks_kept():
    assert ask("/translate es Hello my friend Zorblax") == "Hola Mi amigo Zorblax"
    assert ask("/translate es I *really* like the cat") == "Yo *realmente* como el gato"


@needs_apertium
def test_the_natural_language_triggers_refuse_the_same_way():
    assert ask("translate to English: Guten Morgen").startswith("I can't tell which language that is (perhaps German")
    assert ask("translate to English: 你好").startswith("That looks like Chinese, and I can't translate from Chinese")
    assert ask("how do you say 'Hello, how are you?' in English?").startswith("That already looks like English.")
    assert ask("translate from Spanish to English: Guten Morgen").startswith(
        "I couldn't translate that from Spanish into English: Guten, Morgen are not in my dictionary.")


@needs_apertium
def test_apertium_that_takes_too_long_is_stopped():
    assert ask("/translate es Hello", {"timeout": 0.001}) == (
        "Apertium took longer than 0.001 s; please send a shorter text.")


# ---------------------------------------------------------------- transformers (a tiny MarianMT)

CORPUS = [
    "hello, how are you?", "good morning, my friend", "the cat is on the table",
    "where is the station?", "thank you very much", "I would like a coffee, please",
    "hola, cómo estás?", "buenos días, mi amigo", "el gato está en la mesa",
    "dónde está la estación?", "muchas gracias", "quisiera un café, por favor",
] * 10


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory) -> Path:
    """A one-layer MarianMT with a SentencePiece vocabulary trained here, saved like an opus-mt folder.

    Its weights are random: the tests check the plumbing (loading, generation, caching), not the wording.
    """
    import sentencepiece
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    work = tmp_path_factory.mktemp("marian-parts")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(work / "spm"),
                                             vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(work / "spm.model"))
    vocab = {pieces.id_to_piece(index): index for index in range(pieces.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (work / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(source_spm=str(work / "spm.model"), target_spm=str(work / "spm.model"),
                                vocab=str(work / "vocab.json"))
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                          forced_eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-marian")
    tokenizer.save_pretrained(folder)
    MarianMTModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every model the plugin loads, in order."""
    loaded: list[str] = []
    real_load = translate.load_marian

    def counting_load(source: str):
        loaded.append(source)
        return real_load(source)

    monkeypatch.setattr(translate, "load_marian", counting_load)
    return loaded


def marian_config(models: dict, **more) -> dict:
    return {"backend": "transformers", "models": models, "max_new_tokens": 8, **more}


def test_transformers_translates_with_the_configured_folder_and_loads_it_once(tiny_marian, loads):
    from transformers import MarianMTModel, MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(tiny_marian)
    model = MarianMTModel.from_pretrained(tiny_marian)
    output = model.generate(**tokenizer(["Hello, how are you?"], return_tensors="pt"), max_new_tokens=8)
    expected = tokenizer.decode(output[0], skip_special_tokens=True).strip()

    bot = make_bot({"plugins": {"translate": marian_config({"eng-spa": str(tiny_marian)})}})

    async def talk():
        return await bot.ask_async("/translate es Hello, how are you?"), await bot.ask_async("/translate eng>spa Hello, how are you?")

    first, second = run(talk())
    assert expected and first == expected and second == expected
    assert first != "Hello, how are you?"
    assert loads == [str(tiny_marian)]


def test_transformers_lists_the_configured_pairs_for_other_languages(tiny_marian):
    config = marian_config({"en-es": str(tiny_marian)}, model="")
    assert ask("/translate xx hello", config) == "I can't translate into xx. Available pairs: eng→spa."
    assert ask("/translate fr hello", config) == (
        "I can't translate into French. Available pairs: eng→spa. To add English→French: hf download "
        "Helsinki-NLP/opus-mt-en-fr --local-dir models/opus-mt-en-fr, then set plugins.translate.models: "
        "{eng-fra: models/opus-mt-en-fr}.")


def test_a_hub_model_missing_offline_says_to_set_a_local_folder(tiny_marian, loads):
    reply = ask("/translate eng>fra hello", marian_config({"eng-spa": str(tiny_marian)}))
    assert reply.startswith("The translation model 'Helsinki-NLP/opus-mt-en-fr' for eng→fra cannot be loaded (OSError). "
                            "Set plugins.translate.models to a local folder")
    assert reply.endswith("Available pairs: eng→spa.")
    assert loads == ["Helsinki-NLP/opus-mt-en-fr"]


def test_transformers_detects_the_source_among_the_models_for_the_target(tiny_marian, tmp_path, loads):
    from_french = shutil.copytree(tiny_marian, tmp_path / "fr-en")
    bot = make_bot({"plugins": {"translate": marian_config({"spa-eng": str(tiny_marian), "fra-eng": str(from_french)})}})

    async def talk():
        await bot.ask_async("/translate en Hola, ¿cómo estás? Muy bien, gracias.")
        await bot.ask_async(f"/translate en {FRENCH}")

    run(talk())
    assert loads == [str(tiny_marian), str(from_french)]


def test_a_transformers_output_equal_to_the_input_is_not_a_translation():
    assert translate.untranslated("Guten Morgen", "guten  morgen", unknown=[])
    assert translate.untranslated("Bonjour, comment allez-vous?", "Bonjour, comentario allez-vous?",
                                  unknown=["Bonjour", "allez", "vous"])  # most words unknown
    assert not translate.untranslated("Hello my friend Zorblax", "Hola Mi amigo Zorblax", unknown=["Zorblax"])
    assert not translate.untranslated("Hello", "Hola", unknown=[])


def test_a_missing_python_package_names_the_pip_install(tiny_marian, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    reply = ask("/translate es hello", marian_config({"eng-spa": str(tiny_marian)}))
    assert reply == ("This needs the Python package 'sentencepiece', which is not installed: pip install sentencepiece")


# ---------------------------------------------------------------- a backend per pair

@needs_apertium
def test_a_configured_model_adds_its_pair_next_to_apertiums(tiny_marian, loads):
    """The default backend keeps Apertium's pairs; `models` adds Chinese→English through MarianMT."""
    bot = make_bot({"plugins": {"translate": {"models": {"zho-eng": str(tiny_marian)}, "max_new_tokens": 8}}})

    async def talk():
        return (await bot.ask_async("/translate en 你好"),
                await bot.ask_async("/translate en Hola, ¿cómo estás? Muy bien, gracias."),
                await bot.ask_async("/translate xx hello"))

    chinese, spanish, unknown = run(talk())
    assert loads == [str(tiny_marian)]  # 你好 went to the model, Spanish to Apertium
    assert chinese and chinese != "你好" and "你好" not in chinese
    assert spanish == "Hello, how you are? Very well, thank you."
    assert unknown == "I can't translate into xx. Available pairs: eng→spa, spa→eng, zho→eng."


def test_configured_models_work_without_apertium(tiny_marian, monkeypatch, tmp_path, loads):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apertium program
    reply = ask("/translate en 人工智能的未来发展趋势与挑战", {"models": {"zho-eng": str(tiny_marian)}, "max_new_tokens": 8})
    assert loads == [str(tiny_marian)] and reply and "人工智能" not in reply
    # Spanish would need Apertium: the reply lists what there is and how to add the pair.
    assert ask("/translate es hello", {"models": {"zho-eng": str(tiny_marian)}}).startswith(
        "I can't translate into Spanish. Available pairs: zho→eng. To add English→Spanish: ")


def test_a_chinese_variety_in_models_is_the_chinese_detection_gives(tiny_marian, loads):
    """langid answers 'zh' for every Chinese: a pair keyed 'cmn-eng' must serve 你好 too."""
    reply = ask("/translate en 你好", {"models": {"cmn-eng": str(tiny_marian)}, "max_new_tokens": 8})
    assert loads == [str(tiny_marian)] and reply and "你好" not in reply
    assert translate.iso639_3("Mandarin Chinese") == "zho" and translate.iso639_3("cmn") == "zho"
    assert translate.iso639_3("nob") == "nob"  # a language langid knows by itself is left alone


@pytest.fixture(scope="module")
def tiny_multi_target_marian(tiny_marian, tmp_path_factory) -> Path:
    """The tiny MarianMT with target-language tokens, as opus-mt-en-zh has (>>cmn_Hans<<, >>cmn_Hant<<, >>yue<<)."""
    from transformers import MarianConfig, MarianMTModel

    folder = Path(shutil.copytree(tiny_marian, tmp_path_factory.mktemp("multi") / "opus-mt-en-zh"))
    vocab = json.loads((folder / "vocab.json").read_text())
    for code in (">>cmn_Hans<<", ">>cmn_Hant<<", ">>yue<<"):
        vocab[code] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    config = MarianConfig.from_pretrained(folder)
    config.vocab_size = len(vocab)
    MarianMTModel(config).save_pretrained(folder)
    return folder


def test_a_model_with_target_language_tokens_is_told_the_target(tiny_multi_target_marian, monkeypatch):
    """opus-mt-en-zh writes Simplified, Traditional or Cantonese as a >>code<< token at the start says."""
    from transformers import MarianMTModel

    seen: list[list[str]] = []
    real_generate = MarianMTModel.generate

    def spying_generate(self, input_ids=None, **kwargs):
        seen.append(translate.load_marian(str(tiny_multi_target_marian))[0].convert_ids_to_tokens(input_ids[0]))
        return real_generate(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(MarianMTModel, "generate", spying_generate)
    reply = ask("/translate eng>zho Hello, how are you?",
                {"models": {"eng-zho": str(tiny_multi_target_marian)}, "max_new_tokens": 8})
    assert reply and not reply.startswith("I can't")
    assert seen and seen[0][0] == ">>cmn_Hans<<"  # Simplified Chinese, the default for zho
    assert ask("/translate eng>deu Hello, how are you?",
               {"models": {"eng-deu": str(tiny_multi_target_marian)}, "max_new_tokens": 8}) == (
        "The translation model for eng→deu needs a target-language token, and it has none for German "
        "(it has >>cmn_Hans<<, >>cmn_Hant<<, >>yue<<).")
