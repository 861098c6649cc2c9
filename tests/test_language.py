"""chatforge.language: the real langid model, over all of its languages."""

from __future__ import annotations

import pytest

from chatforge.language import SURE, Detection, detect_language, rank_languages


def test_sentences_are_detected_among_all_languages_with_iso639_3_codes_and_names():
    assert detect_language("人工智能的未来发展趋势与挑战") == Detection("zho", "Chinese", pytest.approx(1.0, abs=1e-6))
    german = detect_language("Wie geht es dir heute? Mir geht es sehr gut, danke.")
    assert (german.code, german.name, german.sure) == ("deu", "German", True)
    french = detect_language("Bonjour, je voudrais un café, s'il vous plaît. Merci beaucoup.")
    assert (french.code, french.sure) == ("fra", True)
    assert detect_language("Hola, ¿cómo estás? Muy bien, gracias.").code == "spa"


def test_short_texts_are_unsure_and_say_so():
    """langid's weakness: two words give it one or two n-grams. 'sure' is how callers can tell."""
    guten_morgen = detect_language("Guten Morgen")
    assert guten_morgen.code == "deu" and not guten_morgen.sure and guten_morgen.confidence < SURE
    # langid even prefers English for this French greeting, but not with confidence.
    assert not detect_language("Bonjour, comment allez-vous?").sure


@pytest.mark.parametrize("text", ["Hello", "Merci", "12345", "", "   ", "😀"])
def test_a_text_with_nothing_langid_knows_is_none_not_its_prior(text):
    """For these langid finds no feature and answers its prior (English, 17%): that is no detection."""
    assert detect_language(text) is None
    assert rank_languages(text) == []


def test_the_ranking_covers_every_language_most_likely_first():
    ranking = rank_languages("Guten Morgen")
    assert len(ranking) == 97  # all of langid's languages
    assert all(len(guess.code) == 3 and guess.name for guess in ranking)
    assert [guess.confidence for guess in ranking] == sorted((guess.confidence for guess in ranking), reverse=True)
    assert sum(guess.confidence for guess in ranking) == pytest.approx(1.0)
    names = {guess.code: guess.name for guess in ranking}
    assert names["ell"] == "Modern Greek" and names["msa"] == "Malay"  # without ISO 639's "(1453-)", "(macrolanguage)"


def test_langids_own_module_model_is_left_alone():
    import langid

    detect_language("Guten Morgen")
    assert langid.classify("Guten Morgen, wie geht es dir heute?")[0] == "de"


def test_chinese_with_latin_words_is_chinese_not_japanese():
    """langid reads 'Python很好。Java也不错。' as Japanese (0.97+), though Japanese writes kana and this has none."""
    for text in ["Python很好。Java也不错。", "我用Python写程序", "iPhone很贵"]:
        guess = detect_language(text)
        assert guess is not None and guess.code == "zho", (text, guess)
    assert detect_language("Pythonはとてもいいです。").code == "jpn"  # kana: Japanese stays Japanese
    ranking = rank_languages("Python很好。Java也不错。")
    assert sum(guess.confidence for guess in ranking) == pytest.approx(1.0)
