"""Summarize: the gist of a text, or of the conversation so far.

    /summarize TEXT   ->  the two or three sentences that carry the most of it
    /summarize        ->  a summary of this conversation, from memory

Backends: `extractive` (default; LexRank, as its paper's continuous damped
LexRank on sumy's, or sumy's TextRank, so nothing needs downloading and every
sentence of the summary is taken from the text),
`generator` (asks the bot's own language model) and `transformers` (a
sequence-to-sequence summarization model id or folder, such as
`sshleifer/distilbart-cnn-12-6`).

Languages (extractive): with `language: auto` (the default) each text's
language is detected (chatforge.language); an unsure guess, or none, gets
English rules. Chinese is split after 。！？!?… (closing quotes and brackets
stay with their sentence) and at line breaks, and ranked on a Simplified copy
(snownlp's table: sumy's Chinese stop words are Simplified, and jieba's words
mostly), its words segmented by jieba, with sumy's Chinese stop words; the
summary gives the text's own sentences, Traditional ones too. Other languages
pysbd knows are split by pysbd; the rest at Unicode sentence punctuation and
line breaks. Stemmers and stop words are sumy's where it has them; words of
scripts written without spaces (Japanese, Thai...) are compared as character
pairs. A text with no more sentences than a summary keeps is answered with
that, never given back as its own summary.

A summary's sentences are joined as the language writes them (a space; none in
Chinese and Japanese, but a space after a sentence in Latin script there), and a
sentence that only a line break ended (a heading, a list item) keeps its line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import regex
from pydantic import Field, PositiveInt, field_validator
from pydantic_core import PydanticCustomError

from chatforge import (CommandContext, Lazy, Message, PluginConfig, SkillError, Trigger, check_length,
                       hookimpl, match_trigger, require)
from chatforge.language import detect_language

USAGE = "[TEXT]"
UNCHANGED = "The model gave the text back unchanged instead of a summary; try backend: extractive."


class SummarizeConfig(PluginConfig):
    backend: Literal["extractive", "generator", "transformers"] = "extractive"
    algorithm: Literal["lexrank", "textrank"] = "lexrank"
    """For the extractive backend."""
    sentences: PositiveInt = 3
    """Sentences in a summary (extractive), or the length asked of a model."""
    ratio: Optional[float] = Field(None, gt=0, le=1)
    """If set, keep this share of the sentences instead (at least one)."""
    language: str = "auto"
    """Sentence splitting, word segmentation, stemming and stop words: `auto` (detected per text; English rules
    when unsure), or a language's English name or ISO 639 code (`chinese`, `zh`, `german`...)."""
    model: str = "sshleifer/distilbart-cnn-12-6"
    """For the transformers backend: a model id or folder."""
    max_new_tokens: PositiveInt = 120
    max_chars: PositiveInt = 20000
    triggers: list[Trigger] = [
        r"summari[sz]e(?: this)?\s*:\s*(?P<text>.+)",
        r"tl;?dr\s*:\s*(?P<text>.+)",
    ]

    @field_validator("language")
    @classmethod
    def _a_language(cls, value: str) -> str:
        """Caught when the config is read, not as a wrong split later."""
        if value.strip().lower() != "auto" and _iso(value) is None:
            raise PydanticCustomError("language", 'must be "auto", a language\'s English name such as "chinese", '
                                      'or an ISO 639 code such as "zh"')
        return value.strip()


class TooShort(SkillError):
    """A text with no more sentences than its summary would keep: said so, never given back as the summary."""

    def __init__(self, found: int, keep: int) -> None:
        self.found, self.keep = found, keep
        if found == 1:
            message = ("I can find only one sentence in that text, so there is nothing to leave out. "
                       "Send a longer text, with sentence punctuation such as . ! ? or 。")
        else:
            message = (f"That text is already short: {found} sentences, and a summary keeps {keep}, "
                       f"so there is nothing to leave out.")
        super().__init__(message)


# ------------------------------------------------------------------ languages

@functools.cache
def _iso(language: str) -> Any:
    """iso639's Lang for an English name or an ISO 639 code ('Chinese', 'chinese', 'zh', 'zho'), or None."""
    from iso639 import Lang

    for candidate in dict.fromkeys((language.strip(), language.strip().title(), language.strip().lower())):
        try:
            return Lang(candidate)
        except Exception:  # noqa: BLE001 - iso639 raises its own InvalidLanguageValue
            continue
    return None


@dataclass(frozen=True)
class Rules:
    """How one language's text is split into sentences and words, and how a summary is put back together."""

    code: str
    """ISO 639-1 where the language has one, else 639-3: 'zh', 'en', 'vi', 'tlh'."""
    name: str
    """sumy's name for it (stemmer, stop words): 'chinese', 'english'."""
    splitter: Literal["chinese", "pysbd", "punctuation"]
    joiner: str
    """Between two of the summary's sentences: none in Chinese and Japanese (but see ExtractiveSummarizer.join)."""


@functools.cache
def rules_for(language: str) -> Rules:
    """The rules for a configured or detected language; English for a name nobody knows."""
    found = _iso(language)
    if found is None:
        return Rules("en", "english", "pysbd", " ")
    macro = found.macro()
    if found.pt1 == "zh" or (macro is not None and macro.pt1 == "zh"):  # Mandarin, Cantonese... are written alike
        return Rules("zh", "chinese", "chinese", "")
    from pysbd.languages import LANGUAGE_CODES  # Chinese is ours: pysbd gives ”」） to the next sentence

    code = found.pt1 or found.pt3
    name = re.sub(r"\s*\(.*\)$", "", found.name).lower().removeprefix("modern ")  # 'Modern Greek (1453-)'
    return Rules(code, name, "pysbd" if code in LANGUAGE_CODES else "punctuation", "" if code == "ja" else " ")


def language_for(text: str, config: SummarizeConfig) -> str:
    """The language whose rules summarize `text`: the configured one, or with `auto` the detected one.

    An unsure guess (short or mixed text) or none at all (digits, symbols) gets
    English rules rather than another language's. Loads langid on first use
    (about 1.5 s): call it off the event loop.
    """
    if config.language.lower() != "auto":
        return config.language
    guess = detect_language(text)
    return guess.code if guess is not None and guess.sure else "english"


# ------------------------------------------------------------------ sentences

_CLOSERS = r"[\p{Pe}\p{Pf}\"']*"
"""Closing quotes and brackets (”’」』）》»...) that belong to the sentence they follow."""

_CHINESE_END = regex.compile(
    r"(?:[。！？｡!?…⋯]|\.{3,})+" + _CLOSERS          # these end a sentence with or without a space after them
    + r"|(?<!\.)\.(?=" + _CLOSERS + r"(?:\s|$))" + _CLOSERS)  # an ASCII full stop only before a space: not 3.5
"""Where a Chinese sentence ends. Not at ；: GB/T 15834 counts the semicolon with ，、： as punctuation inside
a sentence, and 。？！ as the ends of one. At …… (which takes no 。 after it when it ends a sentence)."""

_ANY_END = regex.compile(
    r"[。！？｡]+" + _CLOSERS + r"|\p{Sentence_Terminal}+(?=" + _CLOSERS + r"(?:\s|$))" + _CLOSERS)
"""Where a sentence ends in a language without its own rules: Unicode's sentence terminals (. ! ? ؟ । ። ...)
before a space or the end, CJK ones anywhere."""

_ENDED = regex.compile(r"[\p{Sentence_Terminal}…⋯]" + _CLOSERS + r"$")
"""A sentence that ends in its own punctuation (not one a line break or the text's end ended)."""

_ONLY_PUNCTUATION = regex.compile(r"[\p{P}\p{S}\s]+")


def split_at(ends: regex.Pattern, text: str) -> list[str]:
    """Sentences ending where `ends` matches, and at line breaks; stray punctuation goes with the sentence before."""
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for end in [match.end() for match in ends.finditer(line)] + [len(line)]:
            piece = line[start:end].strip()
            start = end
            if not piece:
                continue
            if sentences and _ONLY_PUNCTUATION.fullmatch(piece):
                sentences[-1] += piece
            else:
                sentences.append(piece)
    return sentences


# ------------------------------------------------------------------ words

_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_TOKEN = regex.compile(rf"[{_UNSPACED}]+|[^\W{_UNSPACED}]+(?:['’][^\W{_UNSPACED}]+)?")


class _WordTokenizer:
    """What sumy's Sentence needs from a tokenizer: words, without NLTK's downloaded models.

    A run of a script written without spaces (kanji and kana, Thai...) would be
    one "word" as long as a clause, shared by no other sentence; it is taken as
    its overlapping character pairs instead, the usual stand-in for a segmenter.
    """

    language = "english"

    @staticmethod
    def to_words(sentence: str) -> list[str]:
        words = []
        for token in _TOKEN.findall(sentence):
            if len(token) > 2 and regex.match(rf"[{_UNSPACED}]", token):
                words.extend(token[i:i + 2] for i in range(len(token) - 1))
            else:
                words.append(token)
        return words


def _simplified() -> Any:
    """snownlp's Traditional-to-Simplified conversion (MediaWiki's table, phrases too: 人工智慧 -> 人工智能).

    The function behind `SnowNLP(text).han`, without the BM25 index SnowNLP
    builds for every text. Importing snownlp loads its models too (about 5 s,
    once per process).
    """
    snownlp = require("snownlp", "pip install snownlp")
    return snownlp.normal.zh2hans


def _jieba_tokenizer() -> Any:
    """sumy's Chinese tokenizer (jieba), with jieba's dictionary loaded now (about 1 s) and without its chatter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        jieba = require("jieba", "pip install jieba")
    jieba.setLogLevel(logging.WARNING)  # else "Building prefix dict from the default dictionary ..." on stderr
    jieba.initialize()
    from sumy.nlp.tokenizers import Tokenizer

    return Tokenizer("chinese")


# ------------------------------------------------------------------ extractive

class NoCommonWords(SkillError):
    """No two sentences are alike, so every ranking ties and "the summary" would be the first sentences."""

    def __init__(self) -> None:
        super().__init__("No two sentences of that text share a word, so I can't tell which of them carry "
                         "the most of it.")


def _damped_lexrank() -> type:
    """LexRank as its paper's "continuous LexRank" (Erkan & Radev 2004): cosine-weighted links, damped.

    sumy's LexRank links two sentences when their idf-weighted cosine passes
    0.1, gives each a link to itself and no damping. In a short text the words
    it is about are in many of its sentences, so their idf within the text is
    small and few pairs pass; every sentence then keeps its starting share, the
    scores tie, ties go to the earliest, and a ten-sentence text whose opening
    is off its topic got its first sentences back. Here every pair is linked by
    its cosine, no sentence by itself (a sentence like no other links to all, as
    in PageRank), and the scores are the damped walk's, with the paper's jump.
    """
    import numpy
    from sumy.summarizers.lex_rank import LexRankSummarizer

    class DampedLexRank(LexRankSummarizer):
        jump = 0.15
        """The paper's damping d, "typically chosen in the interval [0.1, 0.2]"."""

        def _create_matrix(self, sentences, threshold, tf_metrics, idf_metrics):
            count = len(sentences)
            links = numpy.zeros((count, count))
            for row in range(count):
                for col in range(row + 1, count):
                    similarity = self.cosine_similarity(sentences[row], sentences[col], tf_metrics[row],
                                                        tf_metrics[col], idf_metrics)
                    links[row, col] = links[col, row] = similarity
            if not links.any():
                raise NoCommonWords()
            degrees = links.sum(axis=1, keepdims=True)
            return numpy.where(degrees > 0, links / numpy.maximum(degrees, 1), 1.0 / count)

        def power_method(self, matrix, epsilon):
            count = len(matrix)
            scores = numpy.full(count, 1.0 / count)
            for _ in range(1000):  # the gap shrinks by (1 - jump) a step: ~140 steps to 1e-10
                following = self.jump / count + (1 - self.jump) * matrix.T @ scores
                if numpy.abs(following - scores).sum() < 1e-10:
                    return following
                scores = following
            return scores

    return DampedLexRank


class ExtractiveSummarizer:
    """LexRank or TextRank (sumy) over sentences split by the language's rules (no NLTK data needed).

    One per language, used by every worker thread that summarizes at the same
    time, so what keeps state while it works is made for each call instead:
    pysbd's Segmenter (it keeps the text it splits on itself, so a shared one
    looked for one text's sentences in another and lost them) and sumy's ranker
    (its stemmer may keep the word it stems: nltk's Arabic one does). Each costs
    under half a millisecond. jieba (loaded once), snownlp's table and sumy's
    Chinese tokenizer only read what they keep.
    """

    def __init__(self, algorithm: str, language: str) -> None:
        require("sumy", "pip install sumy")
        from sumy.nlp.stemmers import Stemmer
        from sumy.summarizers.text_rank import TextRankSummarizer
        from sumy.utils import get_stop_words

        self.rules = rules_for(language)
        if self.rules.splitter == "pysbd":
            self._pysbd = require("pysbd", "pip install pysbd")
        self.tokenizer = _jieba_tokenizer() if self.rules.splitter == "chinese" else _WordTokenizer()
        self._as_ranked = _simplified() if self.rules.splitter == "chinese" else None
        try:
            Stemmer(self.rules.name)
            self._stems = True
        except LookupError:
            self._stems = False  # no stemmer for this language: words are compared lower-cased
        self._ranker_class = _damped_lexrank() if algorithm == "lexrank" else TextRankSummarizer
        try:
            self._stop_words = frozenset(get_stop_words(self.rules.name))
        except LookupError:
            self._stop_words = frozenset()  # sumy has no stop-word list for this language; rank without one

    def ranker(self) -> Any:
        """A new sumy summarizer with the language's stemmer and stop words, for one call."""
        from sumy.nlp.stemmers import Stemmer, null_stemmer

        ranker = self._ranker_class(Stemmer(self.rules.name) if self._stems else null_stemmer)
        ranker.stop_words = self._stop_words
        return ranker

    def split(self, text: str) -> list[str]:
        if self.rules.splitter == "chinese":
            return split_at(_CHINESE_END, text)
        if self.rules.splitter == "punctuation":
            return split_at(_ANY_END, text)
        segmenter = self._pysbd.Segmenter(language=self.rules.code, clean=False)
        return [sentence.strip() for sentence in segmenter.segment(text) if sentence.strip()]

    def as_ranked(self, sentence: str) -> str:
        """The sentence as it is ranked: Chinese in Simplified characters, others as they are."""
        return (self._as_ranked(sentence) if self._as_ranked else sentence).strip()

    def _document(self, ranked: list[str]) -> Any:
        from sumy.models.dom import ObjectDocumentModel, Paragraph, Sentence

        return ObjectDocumentModel([Paragraph([Sentence(sentence, self.tokenizer) for sentence in ranked])])

    def words(self, sentences: list[str]) -> list[list[str]]:
        """The words each sentence is ranked on: stemmed, stop words left out, Chinese in Simplified characters."""
        ranker = self.ranker()
        document = self._document([self.as_ranked(sentence) for sentence in sentences])
        return [ranker._to_words_set(sentence) for sentence in document.sentences]

    def summarize(self, sentences: list[str], count: int) -> list[str]:
        """The `count` most central sentences, in their original order and as the text wrote them.

        A sentence said twice ("Noted.") is ranked once: copies of one sentence
        would otherwise make each other the most central. So are two that are
        one sentence in Simplified characters.
        """
        sentences = list(dict.fromkeys(sentences))
        if len(sentences) <= count:
            return sentences
        first: dict[str, int] = {}  # each sentence as ranked -> the first of the text's sentences it stands for
        for index, sentence in enumerate(sentences):
            first.setdefault(self.as_ranked(sentence), index)
        ranker = self.ranker()
        document = self._document(list(first))
        words = [set(ranker._to_words_set(sentence)) for sentence in document.sentences]  # as ranked
        if not any(words[i] & words[j] for i in range(len(words)) for j in range(i + 1, len(words))):
            raise NoCommonWords()
        chosen = sorted(first[str(sentence)] for sentence in ranker(document, count))
        return [sentences[index] for index in chosen][:count]

    def join(self, sentences: list[str]) -> str:
        """The summary's sentences as one text, each followed by what `_after` says."""
        if not sentences:
            return ""
        return "".join(sentence + self._after(sentence) for sentence in sentences[:-1]) + sentences[-1]

    def _after(self, sentence: str) -> str:
        """A line break after a sentence that only a line break ended (a heading, a list item); else the language's
        joiner, but a space after a sentence in Latin script (or Cyrillic...) in Chinese and Japanese.

        A sentence without end punctuation was ended by a line break: the splitters end one nowhere else but at
        the text's end, and the text's last sentence is a summary's last one too.
        """
        if not _ENDED.search(sentence):
            return "\n"
        if self.rules.joiner or not _ends_in_spaced_script(sentence):
            return self.rules.joiner
        return " "


def _ends_in_spaced_script(sentence: str) -> bool:
    """'Python is a popular language.' or 'Go 1.22!' but not '我觉得Python很有用。' or '真的吗?': whether the last
    letter or digit is of a script written with spaces, and no full-width mark (。！」, which hold their own
    space) ends the sentence."""
    if unicodedata.east_asian_width(sentence[-1]) in ("W", "F"):
        return False
    last = _LAST_ALNUM.search(sentence)
    return last is not None and not regex.match(rf"[{_UNSPACED}]", last.group())


_LAST_ALNUM = regex.compile(r"[\p{L}\p{N}](?=[^\p{L}\p{N}]*$)")


# ------------------------------------------------------------------ transformers

class Seq2SeqSummarizer:
    """An encoder-decoder summarization model (BART, T5, Pegasus...) loaded from an id or folder."""

    def __init__(self, model: str) -> None:
        transformers = require("transformers", "pip install transformers")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
            self.model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model).eval()
        except OSError as exc:
            raise SkillError(f"The summarization model {model!r} cannot be loaded ({exc.__class__.__name__}). "
                             f"Set plugins.summarize.model to a local folder, or use backend: extractive.") from None

    def summarize(self, text: str, max_new_tokens: int) -> str:
        import torch

        limit = min(getattr(self.tokenizer, "model_max_length", 1024), 1024)
        inputs = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return self.tokenizer.decode(output[0], skip_special_tokens=True).strip()


@functools.cache
def backend_for(kind: str, algorithm: str, language: str, model: str) -> Lazy[Any]:
    if kind == "transformers":
        return Lazy(lambda: Seq2SeqSummarizer(model))
    return Lazy(lambda: ExtractiveSummarizer(algorithm, language))


# ------------------------------------------------------------------ the skill

def _not_the_input(summary: str, text: str) -> str:
    """A model's summary, unless it is the text itself (the cheap check: equal but for spacing)."""
    if summary.split() == text.split():
        raise SkillError(UNCHANGED)
    return summary


async def summarize(text: str, config: SummarizeConfig, bot: Any) -> str:
    """A summary of `text` with the configured backend; TooShort when there is nothing to leave out."""
    if config.backend == "generator":
        length = f"{config.sentences} sentence{'s' if config.sentences != 1 else ''}"
        return _not_the_input(await bot.generate(f"Summarize the following text in at most {length}.\n\n{text}",
                                                 max_new_tokens=config.max_new_tokens), text)
    if config.backend == "transformers":
        backend = await backend_for(config.backend, config.algorithm, config.language, config.model).get()
        return _not_the_input(await asyncio.to_thread(backend.summarize, text, config.max_new_tokens), text)
    language = await asyncio.to_thread(language_for, text, config)
    backend = await backend_for(config.backend, config.algorithm, language, config.model).get()
    sentences = list(dict.fromkeys(await asyncio.to_thread(backend.split, text)))  # each sentence once
    count = max(1, round(len(sentences) * config.ratio)) if config.ratio else config.sentences
    if len(sentences) <= count:
        raise TooShort(len(sentences), count)
    return backend.join(await asyncio.to_thread(backend.summarize, sentences, count))


_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")
_LETTER = regex.compile(r"\p{L}")


def conversation_text(turns: list) -> str:
    """The remembered turns as text, one sentence-ended line each, for the summarizer.

    A line without end punctuation gets "。" when it is mostly Chinese or
    Japanese characters, "." otherwise, so no splitter runs two turns together.
    """
    lines = []
    for turn in turns:
        text = turn.text.strip()
        if not text:
            continue
        if not _ENDED.search(text):
            cjk = len(_CJK.findall(text))
            text += "。" if cjk * 2 > len(_LETTER.findall(text)) else "."
        lines.append(text)
    return "\n".join(lines)


async def summarize_command(ctx: CommandContext) -> str:
    if ctx.args.strip():
        return await summarize(check_length(ctx.args, ctx.config.max_chars), ctx.config, ctx.bot)
    turns = ctx.bot.history(ctx.message)
    if not turns:
        raise SkillError(f"There is nothing to summarize yet. Send {ctx.bot.command_prefix}summarize TEXT, "
                         f"or chat a little first.")
    text = conversation_text(turns)
    try:
        summary = await summarize(text[-ctx.config.max_chars:], ctx.config, ctx.bot)
    except TooShort as short:
        raise SkillError(f"Our conversation is still short: {short.found} sentence{'s' if short.found != 1 else ''}"
                         f" so far, and a summary keeps {short.keep}.") from None
    return f"Our conversation so far, in short: {summary}"


@hookimpl
def chatforge_config_model():
    return SummarizeConfig


@hookimpl
def chatforge_register_commands(register):
    register("summarize", summarize_command, help="summarize a text, or this conversation", usage=USAGE)


@hookimpl
def chatforge_handle_text(message: Message, bot, config: SummarizeConfig):
    match = match_trigger(message.text, config.triggers)
    if match is None:
        return None
    return summarize(check_length(match.group("text"), config.max_chars), config, bot)
