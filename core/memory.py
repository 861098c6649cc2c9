"""Conversation memory: what the bot remembers of each conversation, and how a store plugs in.

A store keeps `Turn`s under a `ConversationKey`. Stores are backends like
generators and adapters: a `MemoryBackend` registered through the
`chatforge_register_memory_backends` hook and chosen by `memory.backend`
(`sqlite` by default, `memory`, `postgres`, or a third party's). Store
methods are plain blocking calls; the engine makes them off the event loop
(in its own threads), and plugin code already runs in worker threads, so a
slow database never stalls the loop. `chatforge.testing.MemoryStoreContract`
is the conformance suite every store passes.

In a shared conversation each line still has an owner: a user line is its
speaker's, a bot line belongs to the person it answered (`Turn.reply_to`).
That is what a member's /reset and anyone's /forget delete.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Literal, Protocol

from pydantic import BaseModel

from .conversation import ConversationKey
from .hookspecs import hookimpl
from .message import Message

if TYPE_CHECKING:
    from .config import Settings

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    """One remembered line of a conversation."""

    role: Role
    text: str
    created_at: float = 0.0
    user: str = ""
    display_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """What plugins noted about the message (e.g. its sentiment); kept as JSON."""
    reply_to: str = ""
    """For a bot line: the user it answered, so that the reply goes when that person is forgotten.

    SQLite files from before schema 3 did not record it; their bot lines get it from the
    question stored with them where that is unambiguous (see chatforge.sqlite_memory).
    """

    @property
    def owner(self) -> str:
        """Whose line this is: the speaker's, or for a bot line the person it answered ("" if unknown)."""
        return self.reply_to if self.role == "assistant" else self.user


def conversation_key(message: Message, scope: Literal["user", "chat"] = "user") -> ConversationKey:
    """The key of the conversation a message belongs to (kept for plugins: `ConversationKey.of`)."""
    return ConversationKey.of(message, scope)


def trim_step(max_turns: int) -> int:
    """Turns dropped at a time when a conversation outgrows its window: half of it, whole exchanges.

    The engine recalls from `window_start`, and the local model's prompt (chatforge.local.prompt) trims
    history in the same steps, so the prompt's start stays the same for several turns."""
    return max(2, max_turns // 4 * 2)


def window_start(total_turns: int, max_turns: int) -> int:
    """Where a conversation of `total_turns` starts being recalled: fixed until it outgrows `max_turns`,
    then moved on by `trim_step(max_turns)` turns at once (0 while everything fits)."""
    step = trim_step(max_turns)
    return 0 if total_turns <= max_turns else -(-(total_turns - max_turns) // step) * step


CLAIMS_KEPT_FOR = 86400.0
"""Seconds a claimed event id is remembered: platforms redeliver within minutes, not days."""


class MemoryStore(Protocol):
    """What the engine needs from a memory backend. Every method may block; none is called on the event loop.

    A store may set `concurrent_calls` (how many calls it serves at once, e.g. its connection pool's
    size; 4 if unset): the engine makes at most that many at a time.
    """

    def add(self, key: ConversationKey, *turns: Turn) -> None:
        """Append turns to a conversation, all or none, with nothing of another writer between them
        (a question and its answer go in together)."""
        ...
    def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        """The newest `limit` turns, oldest first."""
        ...
    def count(self, key: ConversationKey) -> int:
        """How many turns the conversation has."""
        ...
    def conversations(self, platform: str | None = None) -> list[ConversationKey]:
        """Every conversation that has turns (on `platform` if given), once each, the one whose oldest kept
        turn was stored first first: `chatforge finetune` reads them all, and what was forgotten is not listed."""
        ...
    def forget(self, key: ConversationKey, user: str | None = None) -> int:
        """Delete the conversation, or only `user`'s lines of it and the bot's replies to them; how many."""
        ...
    def about_user(self, platform: str, user: str) -> list[tuple[ConversationKey, Turn]]:
        """Every turn kept about a person, oldest first: their own conversations, and their lines and the
        replies to them in shared ones."""
        ...
    def forget_user(self, platform: str, user: str) -> int:
        """Delete everything `about_user` returns; how many turns were deleted."""
        ...
    def purge_before(self, timestamp: float) -> int:
        """Delete turns older than `timestamp` (the retention period); how many."""
        ...
    def claim(self, event: str) -> bool:
        """True for the first caller to claim `event` (a platform's update id), False for every later one,
        in this process or another sharing the store: an update delivered twice is answered once."""
        ...
    def lock(self, key: ConversationKey) -> ContextManager[None]:
        """Held while a message of the conversation is answered. A store shared by several processes
        makes it exclusive across them (per-conversation order); a local store may return a no-op."""
        ...
    def close(self) -> None: ...


def belongs_to(key: ConversationKey, turn: Turn, platform: str, user: str) -> bool:
    """Whether a turn is about this person: their own conversation, or their line or a reply to them in a shared one."""
    return key.platform == platform and (key.user == user or (key.user is None and turn.owner == user))


class MemoryBackend:
    """A kind of memory store, chosen by `memory.backend: <name>`.

    Subclass it, set `name` and `Config` (a pydantic model of the backend's own keys of the `memory:`
    section; the engine's keys, scope, max_turns, retention_days..., are not in it), and open the store in
    `create`. Keep a driver's import inside `create`. Raise `MemoryUnavailable` with a one-line reason
    when the store can never work as configured (a refused file); a server that is merely down should
    not stop the bot: fail the calls until it returns.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    @classmethod
    def create(cls, config: Any, settings: "Settings") -> MemoryStore:
        raise NotImplementedError

    @classmethod
    def describe(cls, config: Any, settings: "Settings") -> str:
        """Where the store keeps its data, for `chatforge plugins` and logs (never a password)."""
        return cls.name


class MemoryUnavailable(RuntimeError):
    """The configured memory cannot be used: the `memory.<key>` at fault and why, in one line."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"memory.{key}: {problem}")
        self.key = key


class EventClaims:
    """Claimed event ids within one process, forgotten after `CLAIMS_KEPT_FOR` (for stores no other
    process shares)."""

    def __init__(self) -> None:
        self._claimed: dict[str, float] = {}
        self._lock = threading.Lock()

    def claim(self, event: str) -> bool:
        now = time.time()
        with self._lock:
            if len(self._claimed) > 1000:
                self._claimed = {e: at for e, at in self._claimed.items() if at > now - CLAIMS_KEPT_FOR}
            if event in self._claimed:
                return False
            self._claimed[event] = now
            return True


class InMemoryMemory:
    """Memory that lives as long as the process: for tests and experiments."""

    def __init__(self) -> None:
        self._turns: dict[ConversationKey, list[Turn]] = {}
        self._lock = threading.Lock()
        self._claims = EventClaims()

    def add(self, key: ConversationKey, *turns: Turn) -> None:
        stamped = [turn if turn.created_at else _stamped(turn) for turn in turns]
        with self._lock:
            self._turns.setdefault(key, []).extend(stamped)

    def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        with self._lock:
            return list(self._turns.get(key, [])[-limit:]) if limit > 0 else []

    def count(self, key: ConversationKey) -> int:
        with self._lock:
            return len(self._turns.get(key, []))

    def conversations(self, platform: str | None = None) -> list[ConversationKey]:
        with self._lock:
            kept = [(turns[0].created_at, key) for key, turns in self._turns.items()
                    if turns and (platform is None or key.platform == platform)]
        return [key for _, key in sorted(kept, key=lambda pair: pair[0])]  # stable: ties keep the order of adding

    def forget(self, key: ConversationKey, user: str | None = None) -> int:
        if user is None:
            with self._lock:
                return len(self._turns.pop(key, []))
        return self._remove(lambda turn_key, turn: turn_key == key and turn.owner == user)

    def about_user(self, platform: str, user: str) -> list[tuple[ConversationKey, Turn]]:
        with self._lock:
            found = [(key, turn) for key, turns in self._turns.items() for turn in turns
                     if belongs_to(key, turn, platform, user)]
        return sorted(found, key=lambda pair: pair[1].created_at)

    def forget_user(self, platform: str, user: str) -> int:
        return self._remove(lambda key, turn: belongs_to(key, turn, platform, user))

    def purge_before(self, timestamp: float) -> int:
        return self._remove(lambda key, turn: turn.created_at < timestamp)

    def claim(self, event: str) -> bool:
        return self._claims.claim(event)

    def lock(self, key: ConversationKey) -> ContextManager[None]:
        return contextlib.nullcontext()  # one process: the engine's queue already orders the conversation

    def _remove(self, doomed) -> int:
        removed = 0
        with self._lock:
            for key in list(self._turns):
                kept = [turn for turn in self._turns[key] if not doomed(key, turn)]
                removed += len(self._turns[key]) - len(kept)
                if kept:
                    self._turns[key] = kept
                else:
                    del self._turns[key]
        return removed

    def close(self) -> None:
        pass


def _stamped(turn: Turn) -> Turn:
    from dataclasses import replace
    return replace(turn, created_at=time.time())


class InMemoryBackend(MemoryBackend):
    """`memory.backend: memory`: nothing is kept after the process ends."""

    name = "memory"

    class Config(BaseModel):
        model_config = {"extra": "forbid"}

    @classmethod
    def create(cls, config: Any, settings: "Settings") -> MemoryStore:
        return InMemoryMemory()

    @classmethod
    def describe(cls, config: Any, settings: "Settings") -> str:
        return "memory (in this process only)"


@hookimpl
def chatforge_register_memory_backends(register) -> None:
    register(InMemoryBackend)
