"""Getting replies onto a platform: split to its length limit, typing shown, streamed by edits.

Shared by the Discord and Telegram adapters (and any other): each adapter
only says how to send, edit and show typing on its platform.

A cut never falls inside a user-perceived character (an extended grapheme
cluster: an emoji ZWJ sequence, a flag, a skin tone, a letter and its combining
marks), as the `regex` module's grapheme pattern finds them. Lengths are counted
in UTF-16 code units unless an adapter says otherwise: Telegram counts that way,
and for Discord (which counts code points) it is the stricter count, so a part
fits both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from bisect import bisect_right
from typing import AsyncIterator, Awaitable, Callable, Generic, TypeVar

import regex

log = logging.getLogger("chatforge.delivery")

Handle = TypeVar("Handle")

_FENCE = re.compile(r"^\s*(```|~~~)")


_GRAPHEME = regex.compile(r"\X")
_CLOSERS = "”’」』）》〉】〕〗〙〛］｝〞〟\"')]"
_SENTENCE_END = regex.compile(f"[。！？｡．‼⁇⁈⁉]+[{regex.escape(_CLOSERS)}]*")
"""Where a sentence of Chinese or Japanese ends: its full stop, ! or ?, with the quotes and brackets closed after it."""
_CLAUSE_END = regex.compile(f"[，、；：､﹐﹑﹔﹕][{regex.escape(_CLOSERS)}]*")
_SPACE = regex.compile(r"[ \u3000]")


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units (an emoji outside the BMP counts 2): Telegram's count, and the default.

    A lone surrogate (from a broken decoder) counts 1 instead of raising.
    """
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def split_message(text: str, limit: int, measure: Callable[[str], int] = utf16_length) -> list[str]:
    """Parts of at most `limit` (as `measure` counts: the platform's length after escaping).

    Cuts between paragraphs where it can, then between lines; a line too long
    for one part is cut after a sentence of Chinese or Japanese (。！？ and the
    quotes closed after it), then after a clause (，、；：), then at a space,
    then between two characters: never inside one (see the module's doc). A
    code block is never cut open: one that must be split is closed at the end
    of each part and reopened (with its language) in the next.
    """
    if limit < 40:
        raise ValueError("limit must be at least 40 characters")
    parts: list[str] = []
    current = ""
    for separator, block in _blocks(text.replace("\r\n", "\n")):
        for index, piece in enumerate(_fit(block, limit, measure)):
            candidate = f"{current}{separator if index == 0 else chr(10)}{piece}" if current else piece
            if measure(candidate) <= limit:
                current = candidate
            else:
                parts.append(current)
                current = piece
    if current.strip():
        parts.append(current)
    return parts


def _blocks(text: str) -> list[tuple[str, str]]:
    """(separator before it, block): paragraphs, and each fenced code block as a block of its own."""
    blocks: list[tuple[str, str]] = []
    lines: list[str] = []
    separator = "\n"
    in_fence = False

    def close(next_separator: str) -> None:
        nonlocal lines, separator
        if lines:
            blocks.append((separator, "\n".join(lines)))
            lines, separator = [], next_separator
        else:
            separator = next_separator if next_separator == "\n\n" else separator

    for line in text.split("\n"):
        if _FENCE.match(line):
            if not in_fence:
                close("\n")
                lines.append(line)
            else:
                lines.append(line)
                close("\n")
            in_fence = not in_fence
        elif in_fence:
            lines.append(line)
        elif not line.strip():
            close("\n\n")
        else:
            lines.append(line)
    if in_fence:
        lines.append(_FENCE.match(lines[0]).group(1))  # an unclosed fence is closed
    close("\n")
    return blocks


def _fit(block: str, limit: int, measure: Callable[[str], int]) -> list[str]:
    """The block as pieces within `limit`; a code block's pieces are each fenced."""
    if measure(block) <= limit:
        return [block]
    lines = block.split("\n")
    if _FENCE.match(lines[0]) and len(lines) > 1:
        opening, closing = lines[0], lines[-1]
        room = limit - measure(opening) - measure(closing) - 2
        return [f"{opening}\n{chunk}\n{closing}" for chunk in _pack(lines[1:-1], room, measure)]
    return _pack(lines, limit, measure)


def _pack(lines: list[str], limit: int, measure: Callable[[str], int]) -> list[str]:
    """Lines joined into pieces within `limit`; an over-long line is cut at spaces, or hard."""
    pieces: list[str] = []
    current: str | None = None
    for line in lines:
        for chunk in _cut_line(line, limit, measure):
            candidate = chunk if current is None else f"{current}\n{chunk}"
            if measure(candidate) <= limit:
                current = candidate
            else:
                pieces.append(current)
                current = chunk
    if current is not None:
        pieces.append(current)
    return pieces


def _cut_line(line: str, limit: int, measure: Callable[[str], int]) -> list[str]:
    """The line in chunks within `limit`, each cut at the best place the module's rules allow."""
    if measure(line) <= limit:
        return [line]
    ends = [match.end() for match in _GRAPHEME.finditer(line)]  # where a character may end
    at_end = set(ends)
    chunks = []
    start = 0
    while measure(line[start:]) > limit:
        fit = _longest_fit(line, start, ends, limit, measure)
        cut = _best_cut(line, start, fit, at_end)
        stop = cut
        while stop > start and line[stop - 1].isspace() and stop - 1 in at_end:
            stop -= 1
        if stop > start:
            chunks.append(line[start:stop])
        start = cut
        while start < len(line) and line[start].isspace() and start + 1 in at_end:
            start += 1
    chunks.append(line[start:])
    return chunks


def _longest_fit(line: str, start: int, ends: list[int], limit: int, measure: Callable[[str], int]) -> int:
    """The furthest character end after `start` whose text from `start` fits `limit` (found by bisection).

    When not even one character fits (a letter with a hundred combining marks), the cut falls between
    code points within it: the only way left to fit.
    """
    low, high = bisect_right(ends, start), len(ends) - 1
    if low > high or measure(line[start:ends[low]]) > limit:
        ends = list(range(start + 1, len(line) + 1))
        low, high = 0, len(ends) - 1
        if measure(line[start:ends[0]]) > limit:
            return ends[0]  # one code point wider than the limit: sent alone rather than never
    while low < high:  # ends[low] fits; find the last one that does
        middle = (low + high + 1) // 2
        if measure(line[start:ends[middle]]) <= limit:
            low = middle
        else:
            high = middle - 1
    return ends[low]


def _best_cut(line: str, start: int, fit: int, at_end: set[int]) -> int:
    """Where to cut `line[start:fit]`: after its last sentence end, else clause end, else before its last
    space, else at `fit`; a place in the first half is passed over, so that no part is left short."""
    floor = start + (fit - start) // 2
    for pattern in (_SENTENCE_END, _CLAUSE_END):
        for match in reversed(list(pattern.finditer(line, start, fit))):
            if match.end() <= floor:
                break
            if match.end() in at_end:
                return match.end()
    for match in reversed(list(_SPACE.finditer(line, start, fit))):
        if match.start() <= floor:
            break
        if match.start() in at_end:
            return match.start()
    return fit


@contextlib.asynccontextmanager
async def keep_typing(show: Callable[[], Awaitable[object]], every: float) -> AsyncIterator[None]:
    """Show a typing indicator now and every `every` seconds until the block ends.

    Platforms drop the indicator after a few seconds (Telegram after 5, Discord
    after 10), so it is refreshed while the model works. Failures only log.
    """

    async def refresh() -> None:
        while True:
            try:
                await show()
            except Exception as exc:  # noqa: BLE001 - typing is a courtesy, never a failure
                log.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(every)

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class RetryAfter(Exception):
    """Raised by an adapter's edit when the platform says to wait (HTTP 429)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"rate limited; retry after {seconds} s")
        self.seconds = seconds


class StreamingReply(Generic[Handle]):
    """Shows a reply as it is generated: sends the first words, then edits the message.

    At most one edit per `interval` seconds; a `RetryAfter` from the platform
    pauses edits for as long as it asks. `finish` always delivers the final text.
    Past `limit` (as `measure` counts), the message shows what will be its final
    part, cut as `split_message` cuts, and "…".
    """

    def __init__(
        self,
        send: Callable[[str], Awaitable[Handle]],
        edit: Callable[[Handle, str], Awaitable[object]],
        interval: float = 1.5,
        limit: int = 2000,
        measure: Callable[[str], int] = utf16_length,
    ) -> None:
        if limit < 41:  # a preview is a part of split_message's (at least 40) and "…"
            raise ValueError("limit must be at least 41 characters")
        self.send, self.edit, self.interval, self.limit, self.measure = send, edit, interval, limit, measure
        self.text = ""
        self.shown = ""
        self.handle: Handle | None = None
        self.next_edit_at = 0.0
        self.edits = 0
        self.max_attempts = 5
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def on_text(self, piece: str) -> None:
        """The generator's callback: called on the event loop with each new piece."""
        self.text += piece
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            wait = self.next_edit_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._show(self._preview(self.text))

    def _preview(self, text: str) -> str:
        """The text so far; past the limit, the part the message will end with, and "…"."""
        if self.measure(text) <= self.limit:
            return text
        first = split_message(text, self.limit - self.measure("…"), self.measure)
        return first[0] + "…" if first else ""

    async def _show(self, text: str) -> None:
        if not text.strip() or text == self.shown:
            return
        try:
            if self.handle is None:
                self.handle = await self.send(text)
            else:
                await self.edit(self.handle, text)
                self.edits += 1
            self.shown = text
            self.next_edit_at = time.monotonic() + self.interval
        except RetryAfter as limited:
            log.info("edit rate-limited; waiting %.1f s", limited.seconds)
            self.next_edit_at = time.monotonic() + limited.seconds
            self._changed.set()  # try again after the pause

    async def finish(self, final_text: str) -> list[str]:
        """Stop streaming and make sure `final_text` is what the chat shows.

        Returns the parts of `final_text` beyond the first message (the adapter
        sends them as new messages when the reply is longer than one message).
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        parts = split_message(final_text, self.limit, self.measure) or [final_text]
        for _attempt in range(self.max_attempts):
            wait = self.next_edit_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            before = self.next_edit_at
            await self._show(parts[0])
            if self.shown == parts[0] or self.next_edit_at == before:
                return parts[1:]
        raise RuntimeError(f"the platform refused the final edit {self.max_attempts} times")
