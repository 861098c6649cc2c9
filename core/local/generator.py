"""The local language model that answers free text.

One model is shared by every chat. Generation runs on one worker thread, off
the asyncio event loop, so a slow reply never stalls another platform's
heartbeat; replies to different conversations are decoded together there
(core/local/batching.py). Text can be streamed as it is produced; stop sequences
are held back until it is certain they are not the start of a stop sequence.
So is the start of a character: byte-level BPE (GPT-2's, Qwen's) splits many
Chinese characters and emoji over two to four tokens, and until the last one
comes decoding gives U+FFFD, which is not streamed while the reply goes on.
Each conversation's attention cache is kept between turns (core/local/kv_cache.py),
so a follow-up computes only its new tokens before answering.

Sampling settings the user left unset come from the model when it recommends
some (the embedded SmolLM2 does), else from chatforge's defaults. A reply cut
by `max_new_tokens` is ended where a reader can tell: at its last sentence, or
with "…" (always "…" when streamed, since text already shown stays shown).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, Sequence

from ..config import GeneratorConfig
from ..generation import OnText, TextGenerator, count_usage  # noqa: F401 - also importable from here, as before
from ..memory import Turn
from .model_loading import LoadedModel
from .prompt import PromptBuilder

if TYPE_CHECKING:  # torch is imported only once a model is wanted
    from .batching import GenerationStats
    from .kv_cache import PromptCache
    from .lora import Adapter

log = logging.getLogger("chatforge.generator")

class TransformersGenerator:
    """A causal language model loaded through transformers, answering on a worker thread."""

    def __init__(
        self, loaded: LoadedModel, config: GeneratorConfig, history_tokens: int = 768, trim_turns: int = 10,
        adapter: Adapter | None = None,
    ) -> None:
        import torch

        from .batching import ContinuousBatcher, Sampling
        from .kv_cache import PromptCache

        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.adapter = adapter
        """The LoRA adapter merged into the model (`generator.adapter`), for `/stats`; None without one."""
        torch.set_num_threads(config.threads)
        self.prompts = prompt_builder(loaded, config, history_tokens, trim_turns)
        self.stop_sequences = self.prompts.reply_stops + list(config.stop)
        self.last_stats: GenerationStats | None = None
        self.generated_tokens = 0
        """Tokens generated since start, all replies together (for /stats and benchmarks)."""
        self.prompt_cache: PromptCache | None = None
        if config.kv_cache:
            self.prompt_cache = PromptCache(config.kv_cache_conversations, int(config.kv_cache_mb * 2**20))
        sampling = Sampling(**sampling_settings(config, loaded.sampling, loaded.name), seed=config.seed)
        self.batcher = ContinuousBatcher(
            self.model, sampling, _eos_token_ids(self.model, self.tokenizer), config.max_batch,
            self.prompt_cache, lambda: _new_cache(self.model),
        )

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
        streamer = _StopAwareStreamer(self.tokenizer, self.stop_sequences, emit)
        from .batching import Job

        job = Job(input_ids, max_new_tokens, streamer.put, reuse)
        try:
            stats = await asyncio.wrap_future(self.batcher.submit(job))
        except asyncio.CancelledError:
            job.abandoned = True  # free its place in the batch
            raise
        # The worker's pieces have all been delivered by now (they were queued before the result); the rest
        # is sent from here, on the event loop, so it arrives before this returns.
        streamer.emit = on_text
        streamer.end()
        text = streamer.final_text()
        if len(streamer.ids) >= max_new_tokens and not streamer.stopped:  # the limit, not EOS or a stop, ended it
            ended = end_cut_reply(text, streamed=on_text is not None)
            if on_text is not None and len(ended) > len(text):
                on_text(ended[len(text):])
            text = ended
        self.last_stats = stats
        self.generated_tokens += stats.new_tokens
        count_usage(stats.prompt_tokens, stats.new_tokens)
        log.debug("generated %d tokens in %.2f s (%.1f tokens/s after the first at %.2f s; %d of %d prompt "
                  "tokens reused; batch of %d)", stats.new_tokens, stats.seconds, stats.tokens_per_second,
                  stats.first_token_seconds, stats.reused_tokens, stats.prompt_tokens, stats.batch_size)
        return text

    def close(self) -> None:
        """Stop the generations in progress (at their next token), drop queued ones, free the thread and caches."""
        self.batcher.close()
        if self.prompt_cache is not None:
            self.prompt_cache.clear()


def prompt_builder(loaded: LoadedModel, config: GeneratorConfig, history_tokens: int = 768,
                   trim_turns: int = 10) -> PromptBuilder:
    """The generator's PromptBuilder for this model and config; fine-tuning builds its examples with the
    same one (core/local/finetune.py), so the model is trained on the prompts it will be given."""
    context_window = config.context_window or _declared_context(loaded.model, loaded.tokenizer)
    return PromptBuilder(loaded.tokenizer, config.system_prompt, context_window, config.max_new_tokens,
                         history_tokens, trim_turns)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_settings(config: GeneratorConfig, recommended: dict[str, float], model_name: str) -> dict[str, Any]:
    """Each sampling setting from the config if the user set it, else the model's recommendation if it has
    one, else chatforge's default; logged once at INFO, saying which came from where."""
    chosen: dict[str, Any] = {}
    origin: dict[str, list[str]] = {}
    for key in SAMPLING_KEYS:
        from_model = key in recommended and key not in config.model_fields_set
        chosen[key] = recommended[key] if from_model else getattr(config, key)
        origin.setdefault(f"recommended for {model_name}" if from_model else "config", []).append(
            f"{key} {chosen[key]:g}")
    log.info("sampling: %s", "; ".join(f"{', '.join(keys)} ({where})" for where, keys in origin.items()))
    return chosen


_SENTENCE_END = re.compile(r"""(?:(?<!\d)\.|[!?…])["'”’)\]]*(?=\s|$)|[。！？｡‼⁇⁈⁉]+[”’」』）》〉】〕］｝"')\]]*|\n""")
"""The end of a sentence (its closing quotes or brackets included), or a line break. A full stop after a
digit is not one: "105.4", "1. the Louvre". Chinese and Japanese put no space after a sentence: their full
stop, ! and ? end one wherever they are ("今天很好。我们走吧")."""


def end_cut_reply(text: str, streamed: bool) -> str:
    """A reply the token limit cut, ended so that it reads as whole or visibly cut.

    Unstreamed, it goes back to its last sentence end if that keeps at least half of it; otherwise, or
    when streamed (shown text cannot be taken back), "…" marks the cut. A reply that already ends a
    sentence is left alone.
    """
    text = text.rstrip()
    if not text:
        return text
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] == len(text):
        return text
    if not streamed:
        kept = [end for end in ends if end >= len(text) / 2]
        if kept:
            return text[:kept[-1]].rstrip()
    return text + "…"


def _declared_context(model: Any, tokenizer: Any) -> int:
    """The context window the model declares (GPT-2: 1,024), with a sane default."""
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 1024


def _new_cache(model: Any) -> Any:
    """An empty cache for the model to fill and the pool to keep; None if this model needs another kind."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception as exc:  # noqa: BLE001 - an unusual architecture: no reuse, no batching
        log.debug("no reusable cache for this model: %s: %s", type(exc).__name__, exc)
        return None


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a reply: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


_PART_OF_A_CHARACTER = "\ufffd"
"""What decoding gives for the first bytes of a character whose last bytes are still to come."""


class _StopAwareStreamer:
    """Collects generated ids; emits text that can no longer turn into a stop sequence, in whole characters,
    and never whitespace the reply may end with (a reply is stripped: the stream must be the same text)."""

    def __init__(self, tokenizer: Any, stop_sequences: list[str], emit: OnText | None) -> None:
        self.tokenizer = tokenizer
        self.stop_sequences = [stop for stop in stop_sequences if stop]
        self.hold_back = max((len(stop) for stop in self.stop_sequences), default=1) - 1
        # A token holds at least one byte, so a stop of n UTF-8 bytes ("\n用户：" is 10) ends within the last
        # n tokens (+ a margin for tokens that decode to nothing).
        self.tail_tokens = max((len(stop.encode("utf-8")) for stop in self.stop_sequences), default=1) + 5
        self.emit = emit
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        """A stop sequence ended the reply."""

    def put(self, token: int) -> bool:
        """Take the next token (on the generator's thread); True once a stop sequence is complete."""
        self.ids.append(token)
        if self.emit is not None:
            self.stopped = self._emit(final=False)
        elif self.stop_sequences:
            tail = self.tokenizer.decode(self.ids[-self.tail_tokens:], skip_special_tokens=True)
            self.stopped = any(stop in tail for stop in self.stop_sequences)
        return self.stopped

    def end(self) -> None:
        if self.emit is not None:
            self._emit(final=True)

    def text(self) -> str:
        return self._cut()[0]

    def _cut(self) -> tuple[str, bool]:
        """The reply so far, up to its first stop sequence; and whether a stop sequence was found."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(_PART_OF_A_CHARACTER):
            # The reply ended (token limit, EOS) or paused in the middle of a character: never show half
            # of one. (A real U+FFFD at the very end is dropped too; that costs nothing.)
            text = text[:-1]
        cut = min((i for i in (text.find(stop) for stop in self.stop_sequences) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def final_text(self) -> str:
        return self.text().strip()

    def _emit(self, final: bool) -> bool:
        """Send what is certain; True when a stop sequence was reached."""
        text, stopped = self._cut()
        if final or stopped:
            ready = text.strip()
        else:  # whole characters only, the last few held back as a possible stop's start
            shown = text.lstrip().rstrip(_PART_OF_A_CHARACTER)
            ready = shown[: max(0, len(shown) - self.hold_back)].rstrip()
        if len(ready) > self.sent:
            piece, self.sent = ready[self.sent:], len(ready)
            self.emit(piece)
        return stopped
