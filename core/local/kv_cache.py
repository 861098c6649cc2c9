"""Keeping the model's attention cache between a conversation's turns.

Each turn's prompt is the whole transcript again: the previous prompt, the
previous reply, then the new message. The keys and values the model computed
for that start last turn are still valid, so keeping them (a transformers
`DynamicCache`) lets the next turn run only its new tokens before the first
reply token: the longer the history, the bigger the saving.

Caches are found by their token ids, not by a conversation id: a new prompt
takes the cache it shares the longest prefix with, provided it continues that
cache's whole prompt (so one conversation never takes, and crops, another's
cache for a shared system prompt). The cache is then cropped to the common
prefix, which also absorbs a reply that re-tokenises differently in the next
prompt. A prompt whose history was trimmed (oldest turns dropped) starts
differently and is computed afresh; its old cache ages out.

Memory is bounded by an entry count and a byte budget, least recently used
dropped first. A taken cache leaves the pool until it is put back, so two
generations can never share one. Not thread-safe: the generator uses it from
its single worker thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from typing import Any, Sequence

log = logging.getLogger("chatforge.kv_cache")


@dataclass
class _Entry:
    ids: list[int]
    """The tokens the cache holds keys and values for, in order."""
    prompt_tokens: int
    """How many of `ids` were the prompt; the rest are the reply generated after it."""
    cache: Any
    nbytes: int


class PromptCache:
    """A bounded, least-recently-used pool of attention caches keyed by their token ids."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._keys = count()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def take(self, ids: Sequence[int]) -> tuple[Any | None, int]:
        """Remove and return the cache that `ids` continues, cropped to what it shares, and that length.

        At least the last prompt token is left to compute (the model needs
        its logits), so a cache is never longer than `len(ids) - 1`.
        Returns `(None, 0)` when no cache fits.
        """
        best_key, best = None, 0
        for key, entry in self._entries.items():
            shared = common_prefix(entry.ids, ids)
            if shared >= entry.prompt_tokens and shared > best:
                best_key, best = key, shared
        if best_key is None:
            return None, 0
        entry = self._entries.pop(best_key)
        reused = min(best, len(ids) - 1)
        if reused <= 0:
            return None, 0
        try:
            excess = cached_length(entry.cache) - reused
            if excess > 0:
                entry.cache.crop(-excess)
        except Exception as exc:  # noqa: BLE001 - e.g. a sliding-window layer past its window
            log.debug("cannot crop a cached prompt (%s: %s); computing it afresh", type(exc).__name__, exc)
            return None, 0
        return entry.cache, reused

    def put(self, ids: Sequence[int], prompt_tokens: int, cache: Any) -> None:
        """Keep `cache`, which holds keys and values for `ids`; evict the least recently used beyond the bounds."""
        length = cached_length(cache)
        if length <= 0:
            return
        entry = _Entry(list(ids[:length]), min(prompt_tokens, length), cache, cache_nbytes(cache))
        if entry.nbytes > self.max_bytes:
            log.debug("a %d-token cache (%d bytes) is over the whole budget; not kept", length, entry.nbytes)
            return
        self._entries[next(self._keys)] = entry
        total = self.nbytes
        while len(self._entries) > self.max_entries or total > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            total -= evicted.nbytes

    def clear(self) -> None:
        """Drop every cache (their tensors are freed once no generation holds them)."""
        self._entries.clear()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def cached_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += tensor.nbytes
    return total
