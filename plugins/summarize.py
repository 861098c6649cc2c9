"""Summarize: the gist of a text, or of the conversation so far.

    /summarize TEXT   ->  the two or three sentences that carry the most of it
    /summarize        ->  a summary of this conversation, from memory

Backends: `extractive` (default; LexRank or TextRank from sumy, with pysbd
splitting sentences, so nothing needs downloading and every sentence of the
summary is taken from the text), `generator` (asks the bot's own language
model) and `transformers` (a sequence-to-sequence summarization model id or
folder, such as `sshleifer/distilbart-cnn-12-6`).
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any, Literal, Optional

from pydantic import Field, PositiveInt

from chatforge import (CommandContext, Lazy, Message, PluginConfig, SkillError, Trigger, check_length,
                       hookimpl, match_trigger, require)

USAGE = "[TEXT]"


class SummarizeConfig(PluginConfig):
    backend: Literal["extractive", "generator", "transformers"] = "extractive"
    algorithm: Literal["lexrank", "textrank"] = "lexrank"
    """For the extractive backend."""
    sentences: PositiveInt = 3
    """Sentences in a summary (extractive), or the length asked of a model."""
    ratio: Optional[float] = Field(None, gt=0, le=1)
    """If set, keep this share of the sentences instead (at least one)."""
    language: str = "english"
    """For sentence splitting, stemming and stop words."""
    model: str = "sshleifer/distilbart-cnn-12-6"
    """For the transformers backend: a model id or folder."""
    max_new_tokens: PositiveInt = 120
    max_chars: PositiveInt = 20000
    triggers: list[Trigger] = [
        r"summari[sz]e(?: this)?\s*:\s*(?P<text>.+)",
        r"tl;?dr\s*:\s*(?P<text>.+)",
    ]


# ------------------------------------------------------------------ extractive

class ExtractiveSummarizer:
    """sumy's graph-based sentence ranking, fed with sentences split by pysbd (no NLTK data needed)."""

    def __init__(self, algorithm: str, language: str) -> None:
        pysbd = require("pysbd", "pip install pysbd")
        require("sumy", "pip install sumy")
        from sumy.nlp.stemmers import Stemmer
        from sumy.summarizers.lex_rank import LexRankSummarizer
        from sumy.summarizers.text_rank import TextRankSummarizer
        from sumy.utils import get_stop_words

        self.segmenter = pysbd.Segmenter(language=_pysbd_code(language), clean=False)
        summarizer_class = LexRankSummarizer if algorithm == "lexrank" else TextRankSummarizer
        self.summarizer = summarizer_class(Stemmer(language))
        try:
            self.summarizer.stop_words = get_stop_words(language)
        except LookupError:
            pass  # sumy has no stop-word list for this language; rank without one

    def split(self, text: str) -> list[str]:
        return [sentence.strip() for sentence in self.segmenter.segment(text) if sentence.strip()]

    def summarize(self, sentences: list[str], count: int) -> list[str]:
        """The `count` most central sentences, in their original order."""
        from sumy.models.dom import ObjectDocumentModel, Paragraph, Sentence

        if len(sentences) <= count:
            return sentences
        tokenizer = _WordTokenizer()
        document = ObjectDocumentModel([Paragraph([Sentence(s, tokenizer) for s in sentences])])
        chosen = {str(sentence) for sentence in self.summarizer(document, count)}
        return [sentence for sentence in sentences if sentence in chosen][:count]


class _WordTokenizer:
    """What sumy's Sentence needs from a tokenizer: words, without NLTK's downloaded models."""

    language = "english"

    @staticmethod
    def to_words(sentence: str) -> list[str]:
        return re.findall(r"\w+(?:['’]\w+)?", sentence)


def _pysbd_code(language: str) -> str:
    try:
        from iso639 import Lang

        return Lang(language.title()).pt1 or "en"
    except Exception:  # noqa: BLE001 - unknown names fall back to English rules
        return "en"


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

async def summarize(text: str, config: SummarizeConfig, bot: Any) -> str:
    """A summary of `text` with the configured backend."""
    if config.backend == "generator":
        length = f"{config.sentences} sentence{'s' if config.sentences != 1 else ''}"
        return await bot.generate(f"Summarize the following text in at most {length}.\n\n{text}",
                                  max_new_tokens=config.max_new_tokens)
    backend = await backend_for(config.backend, config.algorithm, config.language, config.model).get()
    if config.backend == "transformers":
        return await asyncio.to_thread(backend.summarize, text, config.max_new_tokens)
    sentences = backend.split(text)
    count = max(1, round(len(sentences) * config.ratio)) if config.ratio else config.sentences
    return " ".join(await asyncio.to_thread(backend.summarize, sentences, count))


def conversation_text(turns: list) -> str:
    """The remembered turns as text, one sentence-ended line each, for the summarizer."""
    lines = []
    for turn in turns:
        text = turn.text.strip()
        if text and text[-1] not in ".!?…":
            text += "."
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
    summary = await summarize(text[-ctx.config.max_chars:], ctx.config, ctx.bot)
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
