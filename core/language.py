"""Which language a text is in, over every language the detector knows: one helper for all skills and plugins.

    from chatforge.language import detect_language

    guess = detect_language("Wie geht es dir heute?")   # Detection(code='deu', name='German', confidence=1.0)
    if guess is None or not guess.sure:
        ...  # say so; don't act on a guess

Why over all languages: a skill that guesses only among the languages it
supports always "finds" one of them, so a German text sent to a Spanish→English
translator came back as its own translation. Detect first, then decide.

The detector is langid (offline, 97 languages, its model ships in the package),
as our own instance with normalised probabilities. Its weakness is short text:
a sentence gets a confidence near 1, two words often well below `SURE`, and a
text with no n-gram it knows ("Hello", "Merci", "12345") only its prior, which
is no detection at all (None). Callers should treat an unsure guess as unsure.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from typing import Any

from .skill import require

SURE = 0.9
"""The confidence from which a guess is taken as the language; langid gives a sentence ~1.0, 'Guten Morgen' 0.55."""


@dataclass(frozen=True)
class Detection:
    code: str
    """ISO 639-3, e.g. 'deu' (macrolanguages where langid has them: 'zho', 'msa')."""
    name: str
    """English name, e.g. 'German'."""
    confidence: float
    """0..1, langid's normalised probability; the confidences of all languages add up to 1."""

    @property
    def sure(self) -> bool:
        return self.confidence >= SURE


_loading = threading.Lock()


@functools.cache
def _identifier() -> Any:
    """langid's model as our own instance (about 1.5 s, once): the module-level one is langid's users' to configure.

    Under a lock: skills call this from several worker threads at once, and each would build the model."""
    with _loading:
        return _build_identifier()


@functools.cache
def _build_identifier() -> Any:
    langid = require("langid.langid", "pip install langid")
    return langid.LanguageIdentifier.from_modelstring(langid.model, norm_probs=True)


@functools.cache
def _language(langid_code: str) -> tuple[str, str]:
    """langid's code (mostly ISO 639-1) -> (ISO 639-3 code, English name without ISO's '(macrolanguage)' notes)."""
    code = require("iso639", "pip install iso639-lang").Lang(langid_code).pt3
    return code, language_name(code)


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")


@functools.cache
def _detectable() -> frozenset[str]:
    """The ISO 639-3 codes langid can answer (97; macrolanguages such as 'zho' for every Chinese)."""
    return frozenset(_language(label)[0] for label in _identifier().nb_classes)


def detected_as(code: str) -> str:
    """The code detection gives for the language `code` names: its macrolanguage when langid knows only that
    ('cmn' Mandarin and 'yue' Cantonese -> 'zho', 'arb' -> 'ara'), else `code`. Config keys go through this,
    so `{cmn-eng: ...}` matches a text detected as Chinese."""
    iso639 = require("iso639", "pip install iso639-lang")
    try:
        macro = iso639.Lang(code).macro()
    except Exception:  # noqa: BLE001 - not a code iso639 knows: leave it as it is
        return code
    if macro is None:
        return code  # most codes ('eng', 'zho'): no need to load langid (1.5 s) to know
    return macro.pt3 if code not in _detectable() and macro.pt3 in _detectable() else code


def rank_languages(text: str) -> list[Detection]:
    """Every language, most likely first; [] when the text has nothing langid can go on."""
    identifier = _identifier()
    if not identifier.instance2fv(text).any():
        return []  # langid would answer its prior (English, 17%) for any such text
    ranking = [(label, float(confidence)) for label, confidence in identifier.rank(text)]
    if _HAN.search(text) and not _KANA.search(text):
        ranking = _chinese_before_japanese(ranking)
    return [Detection(*_language(label), confidence) for label, confidence in ranking]


def _chinese_before_japanese(ranking: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Han characters without kana are Chinese: Japanese always writes kana beside its kanji, but langid reads
    Chinese with Latin words ("Python很好。Java也不错。") as Japanese at 0.97. Their two confidences swap."""
    position = {label: index for index, (label, _) in enumerate(ranking)}
    if "ja" not in position or "zh" not in position or position["zh"] < position["ja"]:
        return ranking
    ja, zh = position["ja"], position["zh"]
    swapped = list(ranking)
    swapped[ja], swapped[zh] = ("zh", ranking[ja][1]), ("ja", ranking[zh][1])
    return swapped


def detect_language(text: str) -> Detection | None:
    """The most likely language of `text`, sure or not (see `Detection.sure`); None when there is nothing to go on.

    The first call loads the model (about 1.5 s); from async code call it with `asyncio.to_thread`.
    """
    ranking = rank_languages(text)
    return ranking[0] if ranking else None


def iso639_3(name_or_code: str) -> str | None:
    """The ISO 639-3 code for an ISO 639 code or an English name ('es', 'spa', 'spanish'); None if unknown.

    As detection gives it: a Chinese variety ('cmn', 'Mandarin Chinese') is 'zho' (`detected_as`).
    """
    iso639 = require("iso639", "pip install iso639-lang")
    word = name_or_code.strip()
    if not word:
        return None
    for candidate in dict.fromkeys((word.lower(), word.title())):  # codes are lower case, names title case
        try:
            code = iso639.Lang(candidate).pt3
        except (iso639.exceptions.InvalidLanguageValue, iso639.exceptions.DeprecatedLanguageValue):
            continue
        if code:  # language families (ISO 639-5 only) have none
            return detected_as(code)
    return None


def language_name(code: str) -> str:
    """'ell' -> 'Modern Greek' (ISO's '(1453-)' and '(macrolanguage)' notes left out)."""
    return re.sub(r"\s*\(.*\)$", "", require("iso639", "pip install iso639-lang").Lang(code).name)
