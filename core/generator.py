"""The local language model that answers free text.

One model is shared by every chat, so generation runs on one worker thread,
off the asyncio event loop: a slow reply never stalls another platform's
heartbeat. Text can be streamed as it is produced; stop sequences are held
back until it is certain they are not the start of a stop sequence. Each
conversation's attention cache is kept between turns (core/kv_cache.py), so a
follow-up computes only its new tokens before answering.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from .config import GeneratorConfig
from .kv_cache import PromptCache
from .memory import Turn
from .model_loading import LoadedModel
from .prompt import PromptBuilder

log = logging.getLogger("chatforge.generator")

OnText = Callable[[str], None]
"""Receives each new piece of reply text as it is generated."""


@dataclass(frozen=True)
class GenerationStats:
    """How the last generation went: for logs and benchmarks."""

    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float
    reused_tokens: int = 0
    """Prompt tokens whose keys and values came from the previous turn's cache, not computed."""

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the model ran before the first reply token."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def tokens_per_second(self) -> float:
        decoding = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decoding if self.new_tokens > 1 and decoding > 0 else 0.0


class TextGenerator(Protocol):
    """What the engine and plugins need from a generator (the test kit's fake has the same shape)."""

    name: str

    async def reply(self, history: Sequence[Turn], text: str, on_text: OnText | None = None) -> str:
        """Answer `text` as the next turn after `history`."""
        ...

    async def complete(self, instruction: str, max_new_tokens: int | None = None) -> str:
        """Answer a one-off instruction with no conversation history."""
        ...

    def close(self) -> None: ...


class TransformersGenerator:
    """A causal language model loaded through transformers, answering on a worker thread."""

    def __init__(self, loaded: LoadedModel, config: GeneratorConfig, history_tokens: int = 768) -> None:
        import torch

        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        torch.set_num_threads(config.threads)
        context_window = config.context_window or _declared_context(self.model, self.tokenizer)
        self.prompts = PromptBuilder(
            self.tokenizer, config.system_prompt, context_window, config.max_new_tokens, history_tokens
        )
        self.stop_sequences = self.prompts.stop_sequences + list(config.stop)
        self.last_stats: GenerationStats | None = None
        self.prompt_cache: PromptCache | None = None
        if config.kv_cache:
            self.prompt_cache = PromptCache(config.kv_cache_conversations, int(config.kv_cache_mb * 2**20))
        self._closing = threading.Event()  # stops a generation in progress at the next token
        # One worker: the model is not safe to run from two threads at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatforge-generator")

    async def reply(self, history: Sequence[Turn], text: str, on_text: OnText | None = None) -> str:
        prompt = self.prompts.build(history, text)
        return await self._run(prompt.input_ids, on_text, self.config.max_new_tokens, reuse=True)

    async def complete(self, instruction: str, max_new_tokens: int | None = None) -> str:
        # One-off instructions are not continued, so they neither use nor crowd out conversations' caches.
        ids = self.prompts.instruction(instruction)
        return await self._run(ids, None, max_new_tokens or self.config.max_new_tokens, reuse=False)

    async def _run(self, input_ids: list[int], on_text: OnText | None, max_new_tokens: int, reuse: bool) -> str:
        loop = asyncio.get_running_loop()
        emit = None
        if on_text is not None:
            emit = lambda piece: loop.call_soon_threadsafe(on_text, piece)  # noqa: E731
        return await loop.run_in_executor(
            self._executor, self._generate_blocking, input_ids, emit, max_new_tokens, reuse
        )

    def _generate_blocking(
        self, input_ids: list[int], emit: OnText | None, max_new_tokens: int, reuse: bool = False
    ) -> str:
        import torch
        from transformers import StoppingCriteriaList

        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        streamer = _StopAwareStreamer(self.tokenizer, self.stop_sequences, emit)
        sampling: dict[str, Any] = {"do_sample": False}
        if self.config.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": self.config.temperature,
                "top_p": self.config.top_p,
                "top_k": self.config.top_k,
            }
        started = time.perf_counter()
        pool = self.prompt_cache if reuse else None
        cache, reused = pool.take(input_ids) if pool is not None else (None, 0)
        if pool is not None and cache is None:
            cache = _new_cache(self.model)
        inputs = torch.tensor([input_ids], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            # Given a cache of `reused` tokens, generate runs only input_ids[reused:] before decoding.
            sequences = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                **({_cache_keyword(): cache} if cache is not None else {}),
                max_new_tokens=max_new_tokens,
                repetition_penalty=self.config.repetition_penalty,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(self._closing)]),
                stop_strings=self.stop_sequences or None,
                tokenizer=self.tokenizer if self.stop_sequences else None,
                **sampling,
            )
        elapsed = time.perf_counter() - started
        first = (streamer.first_token_at or time.perf_counter()) - started
        self.last_stats = GenerationStats(len(input_ids), len(streamer.ids), elapsed, first, reused)
        if pool is not None and cache is not None and not self._closing.is_set():
            pool.put(sequences[0].tolist(), len(input_ids), cache)
        log.debug("generated %d tokens in %.2f s (%.1f tokens/s after the first at %.2f s; %d of %d prompt "
                  "tokens reused)", len(streamer.ids), elapsed, self.last_stats.tokens_per_second, first,
                  reused, len(input_ids))
        return streamer.final_text()

    def close(self) -> None:
        """Stop the generation in progress (at its next token), drop queued ones, free the thread and caches."""
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.prompt_cache is not None:
            self.prompt_cache.clear()


def _declared_context(model: Any, tokenizer: Any) -> int:
    """The context window the model declares (GPT-2: 1,024), with a sane default."""
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 1024


def _new_cache(model: Any) -> Any:
    """An empty cache for generate to fill and the pool to keep; None if this model needs another kind."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception as exc:  # noqa: BLE001 - an unusual architecture: generate without reuse
        log.debug("no reusable cache for this model: %s: %s", type(exc).__name__, exc)
        return None


def _cache_keyword() -> str:
    """generate's cache argument: `cache` since transformers renamed `past_key_values` during 5.x."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


class _StopWhenSet:
    """A stopping criterion that ends generation when the bot shuts down (Ctrl-C, SIGTERM)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class _StopAwareStreamer:
    """Collects generated ids; emits text that can no longer turn into a stop sequence."""

    def __init__(self, tokenizer: Any, stop_sequences: list[str], emit: OnText | None) -> None:
        self.tokenizer = tokenizer
        self.stop_sequences = [stop for stop in stop_sequences if stop]
        self.hold_back = max((len(stop) for stop in self.stop_sequences), default=1) - 1
        self.emit = emit
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.first_token_at: float | None = None

    # transformers' streamer protocol: put() gets the prompt first, then each new token.
    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(int(token) for token in value.reshape(-1).tolist())
        if self.emit is not None:
            self._emit(final=False)

    def end(self) -> None:
        if self.emit is not None:
            self._emit(final=True)

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(stop) for stop in self.stop_sequences) if i >= 0), default=-1)
        return text[:cut] if cut >= 0 else text

    def final_text(self) -> str:
        return self.text().strip()

    def _emit(self, final: bool) -> None:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = self.text()
        if final or len(text) < len(full):  # finished, or a stop sequence was reached
            ready = text.strip()
        else:
            ready = text.lstrip()[: max(0, len(text.lstrip()) - self.hold_back)].rstrip("\ufffd")
        if len(ready) > self.sent:
            piece, self.sent = ready[self.sent:], len(ready)
            self.emit(piece)
