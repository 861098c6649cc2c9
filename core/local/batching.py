"""Continuous batching: one forward pass per token for every reply in progress.

Decoding a token reads every weight of the model from memory, and on a CPU
that, not arithmetic, sets the pace. Replies decoded together read the weights
once per step instead of once per reply, so eight conversations answered at
once take little longer than one. A new request joins the running batch
between two steps (it does not wait for the batch to finish), and a finished
reply leaves it at once, so a short answer is never held back by a long one.

Rows of different lengths share one key/value cache, left-padded: each row's
tokens are the rightmost columns, the attention mask hides the padding, and
positions are passed per row, so padding never shifts them. Each request's
prompt is run on its own first (its prefill), continuing the conversation's
cached keys and values from the previous turn (core/local/kv_cache.py) when there are
some; the row's cache goes back to that pool when its reply is done.

One worker thread owns the model and the batch: the model is not safe to run
from two threads at once. Per-conversation order is the engine's business
(guard.ConversationQueue sends one message per conversation at a time).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .kv_cache import PromptCache

log = logging.getLogger("chatforge.generator")

TokenSink = Callable[[int], bool]
"""Receives each generated token id; returns True once the reply is complete (a stop sequence was reached)."""


@dataclass(frozen=True)
class GenerationStats:
    """How one generation went: for logs and benchmarks."""

    prompt_tokens: int
    new_tokens: int
    seconds: float
    """From the request to its last token, waiting for a place in the batch included."""
    first_token_seconds: float
    reused_tokens: int = 0
    """Prompt tokens whose keys and values came from the previous turn's cache, not computed."""
    batch_size: int = 1
    """The most replies decoded alongside this one (itself included)."""

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the model ran before the first reply token."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def tokens_per_second(self) -> float:
        decoding = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decoding if self.new_tokens > 1 and decoding > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class Job:
    """One generation request: a prompt's token ids, a limit, and where the tokens go."""

    input_ids: list[int]
    max_new_tokens: int
    on_token: TokenSink
    reuse_cache: bool = True
    """Take and keep this conversation's cache; one-off instructions neither use nor crowd out the pool."""
    ignore_eos: bool = False
    """Run to max_new_tokens even past an end-of-sequence token: benchmarks compare equal amounts of work."""
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    abandoned: bool = False
    """Set when nobody waits for the reply any more (its task was cancelled): it ends at the next token."""


class ContinuousBatcher:
    """Runs generation jobs on one worker thread, decoding up to `max_batch` of them together."""

    def __init__(
        self,
        model: Any,
        sampling: Sampling,
        eos_token_ids: set[int],
        max_batch: int = 8,
        prompt_cache: PromptCache | None = None,
        new_cache: Callable[[], Any] = lambda: None,
    ) -> None:
        self.model = model
        self.sampling = sampling
        self.eos_token_ids = eos_token_ids
        self.prompt_cache = prompt_cache
        self.new_cache = new_cache
        self.max_batch = max_batch if max_batch > 1 and _can_batch(model, new_cache()) else 1
        if self.max_batch < max_batch:
            log.info("this model's cache cannot be batched here; answering one request at a time")
        forward = inspect.signature(model.forward).parameters
        self._keep_last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._cache_keyword = cache_keyword(model)
        self._pending: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="chatforge-generator", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets the GenerationStats when the last token is out."""
        with self._wakeup:
            if self._closing.is_set():
                raise RuntimeError("the generator is closed")
            self._pending.append(job)
            self._wakeup.notify()
        return job.future

    def stop(self) -> None:
        """Ask the worker to end replies in progress at their next token and cancel queued ones; no wait."""
        with self._wakeup:
            self._closing.set()
            self._wakeup.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop, and wait for the worker to be done."""
        self.stop()
        self._thread.join(timeout)

    # The worker thread.

    def _serve(self) -> None:
        batch = _Batch()
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._pending or batch.rows or self._closing.is_set()):
                        self._wakeup.wait()
                    if self._closing.is_set():
                        break
                    arrivals = []
                    while self._pending and len(batch.rows) + len(arrivals) < self.max_batch:
                        arrivals.append(self._pending.popleft())
                for job in arrivals:
                    try:
                        self._admit(job, batch)
                    except Exception as exc:  # noqa: BLE001 - the batch may be half changed: fail it whole
                        self._fail([job] + [row.job for row in batch.rows], exc, batch)
                if batch.rows:
                    try:
                        self._step(batch)
                    except Exception as exc:  # noqa: BLE001 - fail the replies in progress, keep serving
                        self._fail([row.job for row in batch.rows], exc, batch)
            for row in batch.rows:  # closing: what each reply has so far is its answer
                self._finish(row, cache=None)
        with self._wakeup:
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()

    def _admit(self, job: Job, batch: _Batch) -> None:
        """Run the job's prompt (its prefill) and choose its first token; then it joins the batch."""
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while it waited
        try:
            row = _Row(job, self.sampling)
            cache, row.reused = (None, 0)
            if job.reuse_cache and self.prompt_cache is not None:
                cache, row.reused = self.prompt_cache.take(job.input_ids)
            if cache is None:
                cache = self.new_cache()
            ids = job.input_ids
            device = self.model.device
            logits, cache = self._forward(
                torch.tensor([ids[row.reused:]], device=device),
                torch.ones((1, len(ids)), dtype=torch.long, device=device),
                torch.arange(row.reused, len(ids), device=device)[None],
                cache,
            )
            self._choose(row, logits[0])
        except Exception as exc:  # noqa: BLE001 - this request fails; the others go on
            log.exception("generation failed before its first token")
            job.future.set_exception(exc)
            return
        row.batch_size = len(batch.rows) + 1
        if row.done:
            self._finish(row, cache)
        else:
            batch.add(row, cache)

    def _step(self, batch: _Batch) -> None:
        """Feed every row its last token, choose each row's next one, and let finished rows go."""
        rows = batch.rows
        device = self.model.device
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        logits, batch.cache = self._forward(
            torch.tensor([[row.ids[-1]] for row in rows], device=device),
            batch.mask,
            torch.tensor([[len(row.ids) - 1] for row in rows], device=device),
            batch.cache,
        )
        for index, row in enumerate(rows):
            row.batch_size = max(row.batch_size, len(rows))
            self._choose(row, logits[index])
        finished = [index for index, row in enumerate(rows) if row.done]
        if finished:
            for index in finished:
                keep = rows[index].job.reuse_cache and self.prompt_cache is not None
                self._finish(rows[index], batch.row_cache(index, self.new_cache) if keep else None)
            batch.remove(finished)

    def _fail(self, jobs: list[Job], exc: Exception, batch: _Batch) -> None:
        """These jobs end with `exc`; the batch starts again empty."""
        log.exception("generation failed for %d replies", len(jobs))
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)
        batch.clear()

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> tuple[Any, Any]:
        """The last position's logits (float32) and the updated cache."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_keyword: cache},
            **self._keep_last_logits,
        )
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        return output.logits[:, -1, :].float(), cache

    def _choose(self, row: _Row, logits: Any) -> None:
        """Pick the row's next token from its logits and hand it on; mark the row done when it ends."""
        token = row.pick(logits)
        row.ids.append(token)
        row.new_tokens += 1
        if row.first_token_at is None:
            row.first_token_at = time.perf_counter()
        if token in self.eos_token_ids and not row.job.ignore_eos:
            row.done = True
            return
        complete = row.job.on_token(token)
        row.done = (bool(complete) or row.new_tokens >= row.job.max_new_tokens or row.job.abandoned
                    or self._closing.is_set())

    def _finish(self, row: _Row, cache: Any) -> None:
        """Return the row's cache to the pool and its stats to whoever waits."""
        job = row.job
        if cache is not None and job.reuse_cache and self.prompt_cache is not None and not self._closing.is_set():
            self.prompt_cache.put(row.ids, len(job.input_ids), cache)
        now = time.perf_counter()
        stats = GenerationStats(
            prompt_tokens=len(job.input_ids),
            new_tokens=row.new_tokens,
            seconds=now - job.submitted,
            first_token_seconds=(row.first_token_at or now) - job.submitted,
            reused_tokens=row.reused,
            batch_size=row.batch_size,
        )
        if not job.future.done():
            job.future.set_result(stats)


class _Row:
    """One reply in progress: its tokens so far and how it picks the next."""

    def __init__(self, job: Job, sampling: Sampling) -> None:
        self.job = job
        self.ids = list(job.input_ids)  # the prompt, then each token generated
        self.new_tokens = 0
        self.reused = 0
        self.batch_size = 1
        self.first_token_at: float | None = None
        self.done = False
        self.processors = _logits_processors(sampling)
        self.sample = sampling.temperature > 0
        self.rng: torch.Generator | None = None
        if self.sample and sampling.seed is not None:
            self.rng = torch.Generator().manual_seed(sampling.seed)  # per reply: batching never changes a draw

    def pick(self, logits: Any) -> int:
        scores = logits[None]
        if self.processors:
            scores = self.processors(torch.tensor([self.ids], device=logits.device), scores)
        if not self.sample:
            return int(scores.argmax(dim=-1))
        probabilities = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=self.rng))


def _logits_processors(sampling: Sampling) -> Any:
    """transformers' own processors for repetition penalty, temperature, top-k and top-p (None if none apply)."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors or None


class _Batch:
    """The rows decoding together and their shared, left-padded key/value cache."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, columns]: 1 for a row's tokens, 0 for its padding

    def add(self, row: _Row, cache: Any) -> None:
        """Join `row`, whose own cache holds all its tokens but the last."""
        length = len(row.ids) - 1
        mask = torch.ones((1, length), dtype=torch.long, device=_device_of(cache))
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        width = max(self.mask.shape[1], length)
        for ours, theirs in zip(self.cache.layers, cache.layers):
            ours.keys = torch.cat([_pad_left(ours.keys, width), _pad_left(theirs.keys, width)])
            ours.values = torch.cat([_pad_left(ours.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.rows.append(row)

    def row_cache(self, index: int, new_cache: Callable[[], Any]) -> Any:
        """A cache of row `index`'s own tokens, padding dropped, that outlives the batch."""
        length = len(self.rows[index].ids) - 1
        if len(self.rows) == 1 and self.mask.shape[1] == length:
            return self.cache  # the row is the whole batch: hand the cache over as it is
        cache = new_cache()
        for layer_index, layer in enumerate(self.cache.layers):
            cache.update(
                layer.keys[index:index + 1, :, -length:, :].clone(),
                layer.values[index:index + 1, :, -length:, :].clone(),
                layer_index,
            )
        return cache

    def remove(self, indices: list[int]) -> None:
        """Drop finished rows, and the columns that only they needed."""
        gone = set(indices)
        keep = [index for index in range(len(self.rows)) if index not in gone]
        if not keep:
            self.clear()
            return
        self.rows = [self.rows[index] for index in keep]
        selected = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[selected]
        start = int(self.mask.any(dim=0).long().argmax())  # the first column a remaining row uses
        for layer in self.cache.layers:
            layer.keys = layer.keys[selected, :, start:, :]
            layer.values = layer.values[selected, :, start:, :]
        self.mask = self.mask[:, start:]


def _device_of(cache: Any) -> Any:
    layers = getattr(cache, "layers", None) or []
    return layers[0].keys.device if layers and getattr(layers[0], "keys", None) is not None else "cpu"


def _pad_left(tensor: Any, width: int, dim: int = -2) -> Any:
    """`tensor` with zeros before its columns along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - (dim % tensor.dim()) - 1) + [missing, 0]
    return F.pad(tensor, pad)


def cache_keyword(model: Any) -> str:
    """The forward argument that takes the attention cache: transformers renamed `past_key_values` to `cache`
    during 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _can_batch(model: Any, cache: Any) -> bool:
    """Rows can share a cache when every layer is a plain growing one and the model takes positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache) or not cache.layers:
        return False
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)
