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
stay with their sentence) and at line breaks, its words segmented by jieba, with
sumy's Chinese stop words, and the summary's sentences joined without spaces.
Other languages pysbd knows are split by pysbd; the rest at Unicode sentence
punctuation and line breaks. Stemmers and stop words are sumy's where it has
them; words of scripts written without spaces (Japanese, Thai...) are compared
as character pairs. A text with no more sentences than a summary keeps is
answered with that, never given back as its own summary.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
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
    """Between the summary's sentences: none in Chinese and Japanese."""


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
    """LexRank or TextRank (sumy) over sentences split by the language's rules (no NLTK data needed)."""

    def __init__(self, algorithm: str, language: str) -> None:
        require("sumy", "pip install sumy")
        from sumy.nlp.stemmers import Stemmer, null_stemmer
        from sumy.summarizers.text_rank import TextRankSummarizer
        from sumy.utils import get_stop_words

        self.rules = rules_for(language)
        if self.rules.splitter == "pysbd":
            pysbd = require("pysbd", "pip install pysbd")
            self.segmenter = pysbd.Segmenter(language=self.rules.code, clean=False)
        self.tokenizer = _jieba_tokenizer() if self.rules.splitter == "chinese" else _WordTokenizer()
        try:
            stemmer = Stemmer(self.rules.name)
        except LookupError:
            stemmer = null_stemmer  # no stemmer for this language: words are compared lower-cased
        summarizer_class = _damped_lexrank() if algorithm == "lexrank" else TextRankSummarizer
        self.summarizer = summarizer_class(stemmer)
        try:
            self.summarizer.stop_words = get_stop_words(self.rules.name)
        except LookupError:
            pass  # sumy has no stop-word list for this language; rank without one

    def split(self, text: str) -> list[str]:
        if self.rules.splitter == "chinese":
            return split_at(_CHINESE_END, text)
        if self.rules.splitter == "punctuation":
            return split_at(_ANY_END, text)
        return [sentence.strip() for sentence in self.segmenter.segment(text) if sentence.strip()]

    def summarize(self, sentences: list[str], count: int) -> list[str]:
        """The `count` most central sentences, in their original order.

        A sentence said twice ("Noted.") is ranked once: copies of one sentence
        would otherwise make each other the most central.
        """
        from sumy.models.dom import ObjectDocumentModel, Paragraph, Sentence

        sentences = list(dict.fromkeys(sentences))
        if len(sentences) <= count:
            return sentences
        document = ObjectDocumentModel([Paragraph([Sentence(s, self.tokenizer) for s in sentences])])
        words = [set(self.summarizer._to_words_set(sentence)) for sentence in document.sentences]  # as ranked
        if not any(words[i] & words[j] for i in range(len(words)) for j in range(i + 1, len(words))):
            raise NoCommonWords()
        chosen = {str(sentence) for sentence in self.summarizer(document, count)}
        return [sentence for sentence in sentences if sentence in chosen][:count]

    def join(self, sentences: list[str]) -> str:
        return self.rules.joiner.join(sentences)


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


_ENDED = regex.compile(r"[\p{Sentence_Terminal}…⋯]" + _CLOSERS + r"$")
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
