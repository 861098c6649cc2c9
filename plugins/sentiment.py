"""Sentiment: is a text positive, neutral or negative?

    /sentiment I love this, it is wonderful!   ->  positive (+0.84)
    /mood                                      ->  the conversation's trend (needs `passive: true`)

Backends: `vader` (default; a rule-based lexicon that works offline) and
`transformers` (any text-classification model id or folder). With
`passive: true`, every free-text message's sentiment is recorded with the
conversation as `turn.meta["sentiment"] = {"label": ..., "score": ...}`,
where other plugins can read it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, PositiveInt

from chatforge import (CommandContext, Lazy, Message, PluginConfig, SkillError, Trigger, check_length,
                       hookimpl, match_trigger, require)

USAGE = "TEXT"


class SentimentConfig(PluginConfig):
    backend: Literal["vader", "transformers"] = "vader"
    model: str = "distilbert-base-uncased-finetuned-sst-2-english"
    """For the transformers backend: a text-classification model id or folder."""
    neutral_below: float = Field(0.05, ge=0, le=1)
    """Scores closer to 0 than this are neutral."""
    passive: bool = False
    """Record the sentiment of every free-text message with the conversation."""
    max_chars: PositiveInt = 5000
    triggers: list[Trigger] = [
        r"(?:what(?:'s| is) the )?sentiment of[:\s]+(?P<text>.+)",
        r"how does this sound[?:\s]+(?P<text>.+)",
    ]


@dataclass(frozen=True)
class Sentiment:
    label: str
    """positive, neutral or negative"""
    score: float
    """from -1 (very negative) to +1 (very positive)"""

    def describe(self) -> str:
        return f"{self.label} ({self.score:+.2f})"


class VaderBackend:
    def __init__(self) -> None:
        vader = require("vaderSentiment.vaderSentiment", "pip install vaderSentiment")
        self.analyzer = vader.SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        return float(self.analyzer.polarity_scores(text)["compound"])


class TransformersBackend:
    """A text-classification pipeline; its labels are mapped to a signed score."""

    def __init__(self, model: str) -> None:
        transformers = require("transformers", "pip install transformers")
        try:
            self.pipeline = transformers.pipeline("text-classification", model=model, top_k=None)
        except OSError as exc:
            raise SkillError(f"The sentiment model {model!r} cannot be loaded ({exc.__class__.__name__}). "
                             f"Set plugins.sentiment.model to a local folder, or use backend: vader.") from None

    def score(self, text: str) -> float:
        scores = self.pipeline(text, truncation=True)
        if scores and isinstance(scores[0], list):
            scores = scores[0]
        signed = 0.0
        for item in scores:
            label = str(item["label"]).lower()
            if label.startswith("pos") or label in {"label_1", "1"}:
                signed += item["score"]
            elif label.startswith("neg") or label in {"label_0", "0"}:
                signed -= item["score"]
        return max(-1.0, min(1.0, signed))


@functools.cache
def backend_for(kind: str, model: str) -> Lazy[Any]:
    """One lazily loaded backend per (kind, model), shared by every chat."""
    if kind == "transformers":
        return Lazy(lambda: TransformersBackend(model))
    return Lazy(VaderBackend)


async def analyze(text: str, config: SentimentConfig) -> Sentiment:
    """The sentiment of `text` with the configured backend (loaded on first use, off the event loop)."""
    import asyncio

    backend = await backend_for(config.backend, config.model).get()
    score = await asyncio.to_thread(backend.score, text)
    if abs(score) < config.neutral_below:
        return Sentiment("neutral", score)
    return Sentiment("positive" if score > 0 else "negative", score)


async def sentiment_command(ctx: CommandContext) -> str:
    if not ctx.args.strip():
        raise SkillError(f"Usage: {ctx.bot.command_prefix}sentiment {USAGE}")
    result = await analyze(check_length(ctx.args, ctx.config.max_chars), ctx.config)
    return result.describe()


def mood_command(ctx: CommandContext) -> str:
    if not ctx.config.passive:
        raise SkillError("Mood tracking is off. Set plugins.sentiment.passive: true in the config to record it.")
    scores = [turn.meta["sentiment"]["score"] for turn in ctx.bot.history(ctx.message)
              if turn.role == "user" and "sentiment" in turn.meta]
    if not scores:
        return "I have no mood readings for this conversation yet."
    average = sum(scores) / len(scores)
    label = "neutral" if abs(average) < ctx.config.neutral_below else ("positive" if average > 0 else "negative")
    half = len(scores) // 2
    trend = "steady"
    if half:
        earlier, later = sum(scores[:half]) / half, sum(scores[half:]) / (len(scores) - half)
        if later - earlier > 0.1:
            trend = "improving"
        elif earlier - later > 0.1:
            trend = "worsening"
    readings = " ".join(f"{score:+.1f}" for score in scores[-10:])
    return (f"Mood over your last {len(scores)} message{'s' if len(scores) != 1 else ''}: {label} "
            f"on average ({average:+.2f}), {trend}. Recent: {readings}")


@hookimpl
def chatforge_config_model():
    return SentimentConfig


@hookimpl
def chatforge_register_commands(register):
    register("sentiment", sentiment_command, help="is a text positive, neutral or negative?", usage=USAGE)
    register("mood", mood_command, help="the mood of this conversation so far")


@hookimpl
def chatforge_preprocess(message: Message, bot, config: SentimentConfig):
    """In passive mode, note the sentiment of each free-text message for memory."""
    if not config.passive or message.text.startswith(bot.command_prefix):
        return None

    async def annotate() -> Message:
        result = await analyze(message.text[: config.max_chars], config)
        return message.replace(meta={**message.meta, "sentiment": {"label": result.label, "score": result.score}})

    return annotate()


@hookimpl
def chatforge_handle_text(message: Message, config: SentimentConfig):
    match = match_trigger(message.text, config.triggers)
    if match is None:
        return None

    async def answer() -> str:
        result = await analyze(check_length(match.group("text"), config.max_chars), config)
        return f"That sounds {result.describe()}."

    return answer()
