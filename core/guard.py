"""What stands between anyone on the internet and the bot: clean text, rate limits, order, a queue cap.

- `clean_text` drops control characters and lone surrogates, so neither the
  prompt nor the SQLite file ever sees them.
- `RateLimiter` is a token bucket per user: a burst is allowed, a flood is not.
- `ConversationQueue` answers one message at a time per conversation, in
  arrival order, and refuses new work (a polite "busy") when too much waits.
- `Notices` says each refusal once a minute, not to every message of a flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import unicodedata
from collections import OrderedDict
from typing import AsyncIterator

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff]")


def clean_text(text: str) -> str:
    """Text safe to store and to put in a prompt: no control characters, no lone surrogates.

    Letters of every script, emoji and right-to-left marks are kept as they are.
    """
    text = text.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> U+FFFD ("?")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", text).strip()


def too_long(length: int, limit: int) -> str:
    """The polite refusal of a message of `length` characters when at most `limit` are read."""
    return f"Your message is {length:,} characters long; I read at most {limit:,}. Please send a shorter one."


class RateLimiter:
    """A token bucket per key: `burst` messages at once, then `per_minute` a minute."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def acquire(self, key: str, now: float | None = None) -> float:
        """0 if `key` may go on (a token is spent), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate if self.rate > 0 else float("inf")
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:  # forget the longest-idle users first
            self._buckets.popitem(last=False)
        return wait


class Notices:
    """Whether a refusal notice ("slow down", "busy") is due for a key: at most once per `interval` seconds.

    A flood is answered with one notice, then silence: replying to every refused
    message would itself flood the chat (and the platform's rate limits).
    """

    def __init__(self, interval: float = 60.0, max_keys: int = 10_000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._until: dict[str, float] = {}

    def due(self, key: str, now: float | None = None) -> bool:
        """True (and the next one `interval` away) if `key` was not told within the last `interval` seconds."""
        now = time.monotonic() if now is None else now
        if self._until.get(key, 0) > now:
            return False
        self._until[key] = now + self.interval
        if len(self._until) > self.max_keys:  # keep only the keys still silenced
            self._until = {other: until for other, until in self._until.items() if until > now}
        return True


class Place:
    """One of the `max_pending` places: held from a message's arrival until its reply is delivered.

    Releasing twice is harmless, so every path out of a message's handling may release it.
    """

    def __init__(self, queue: "ConversationQueue") -> None:
        self._queue: ConversationQueue | None = queue

    def release(self) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.pending -= 1


class ConversationQueue:
    """One message at a time per conversation, first come first served; at most `max_pending` in all.

    `pending` counts every message holding a place, whether it waits in an
    adapter (Telegram answers a chat's messages one at a time), waits for its
    conversation's turn here, or is being answered and delivered.
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}

    def take_place(self) -> Place | None:
        """A place for one more message, or None when `max_pending` are already taken."""
        if self.pending >= self.max_pending:
            return None
        self.pending += 1
        return Place(self)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """Wait for the conversation's earlier messages; the caller already holds a place."""
        self._waiting[key] = self._waiting.get(key, 0) + 1
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:  # asyncio.Lock wakes waiters in the order they came
                yield
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:  # nobody else queued: drop the lock, memory stays bounded
                del self._waiting[key]
                self._locks.pop(key, None)
