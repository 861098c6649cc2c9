"""Helpers for writing skills: user-facing refusals, optional packages, lazy backends, triggers.

The built-in skills (sentiment, summarize, translate) are written with these,
and third-party skills can be too.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import threading
from types import ModuleType
from typing import Annotated, Callable, Generic, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


class SkillError(Exception):
    """Raise with a message for the user: the bot replies with it, not with an apology.

    For what the user can fix (bad arguments, text too long, a language pair not
    installed) or the operator can (a missing package); bugs should just raise.
    """


def require(module: str, install: str) -> ModuleType:
    """Import an optional package, or tell the user what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SkillError(f"This needs the Python package {module!r}, which is not installed: {install}") from None


def check_length(text: str, limit: int) -> str:
    """The text, stripped; a SkillError when it is empty or longer than `limit` characters."""
    text = text.strip()
    if len(text) > limit:
        raise SkillError(f"That text is {len(text):,} characters long; the limit is {limit:,}. "
                         f"Please send a shorter one.")
    return text


class Lazy(Generic[T]):
    """A backend built on first use, in a worker thread, exactly once."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._value: T | None = None
        self._built = False

    async def get(self) -> T:
        if self._built:
            return self._value  # type: ignore[return-value]
        return await asyncio.to_thread(self._build)

    def _build(self) -> T:
        with self._lock:
            if not self._built:
                self._value = self._factory()
                self._built = True
        return self._value  # type: ignore[return-value]


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    if "(?P<text>" not in pattern:
        raise ValueError("a trigger needs a (?P<text>...) group for the text to work on")
    return pattern


Trigger = Annotated[str, AfterValidator(_compiles)]
"""A config field type: a regular expression with a `(?P<text>...)` group."""


def match_trigger(text: str, patterns: list[str]) -> re.Match[str] | None:
    """The first trigger that matches the start of `text` (case-insensitive), if any."""
    for pattern in patterns:
        match = re.match(pattern, text, re.IGNORECASE | re.DOTALL)
        if match and match.group("text").strip():
            return match
    return None
