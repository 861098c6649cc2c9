"""What `chatforge finetune` trains on: dialogues from a JSONL file, from the bot's own memory, or from a corpus.

Every source gives `Dialogue`s: user and assistant turns taking turns, the first a user's and the last an
assistant's, so that each assistant turn is the answer to the user turn before it (the training side,
chatforge.local.finetune, learns only those answers). No torch here: the data is read and checked before
any model is loaded, and bad data is a `DataError` naming the file and line, never a traceback.

- `read_jsonl(path)`: one dialogue a line, `{"messages": [{"role", "content"}...]}` (the OpenAI / Hugging Face
  chat format, a first system message kept as `Dialogue.system`) or `{"prompt", "response"}` (or "completion").
- `from_memory(store, settings)`: every stored conversation, read at training time, so what /forget and /reset
  deleted is gone; `memory.redact` and `memory.retention_days` applied again, as they stand today.
- `dialogue_corpora(host)`: corpora plugins register through `chatforge_register_dialogue_corpora`.
- `split_held_out(dialogues, fraction, seed)`: the held-out dialogues the perplexity is measured on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import pii
from .memory import Turn

if TYPE_CHECKING:
    from .config import Settings
    from .conversation import ConversationKey
    from .memory import MemoryStore
    from .plugin_manager import PluginHost

ROLES = ("system", "user", "assistant")
ERRORS_SHOWN = 5
"""Bad lines listed in one DataError: enough to see a pattern, few enough to read."""
MEMORY_SOURCE = "memory:"
"""How the source of a conversation from the bot's memory starts (then its key)."""
CORPUS_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class DataError(ValueError):
    """Training data that cannot be used: `FILE:LINE: what is wrong` (several lines when several are bad)."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        """The first bad line (1-based), when the data is a file."""


@dataclass(frozen=True)
class Dialogue:
    """One conversation to learn from.

    Built from any turns, it keeps only what can be learnt: each turn's text stripped, empty turns dropped,
    consecutive turns of one role merged with "\\n", assistant turns before the first user turn and user turns
    after the last assistant turn dropped (nothing answers them). What remains alternates user, assistant,
    ..., assistant; a DataError when nothing does. Only role and text are kept: no user ids, names or times;
    and `meta={"learn": False}` on an assistant turn to keep as context but not to learn (a reply a plugin
    wrote, in the bot's memory), also when only one of the turns merged into it had it.
    """

    turns: tuple[Turn, ...]
    system: str | None = None
    source: str = ""
    """Where it came from, for messages: "data.jsonl:12", "memory:telegram/42 (7)", "corpus:chitchat/<id>"."""

    def __post_init__(self) -> None:
        merged: list[list[Any]] = []
        for turn in self.turns:
            if not isinstance(turn, Turn) or turn.role not in ("user", "assistant") or not isinstance(turn.text, str):
                raise DataError(f"{turn!r} is not a chatforge.memory.Turn of a user or the assistant")
            text = turn.text.strip()
            if not text:
                continue
            learn = turn.meta.get("learn") is not False
            if merged and merged[-1][0] == turn.role:
                merged[-1][1] += "\n" + text
                merged[-1][2] = merged[-1][2] and learn
            else:
                merged.append([turn.role, text, learn])
        if not any(role == "assistant" for role, _, _ in merged):
            raise DataError("no assistant turn (nothing to learn from)")
        while merged and merged[0][0] != "user":
            merged.pop(0)
        while merged and merged[-1][0] != "assistant":
            merged.pop()
        if not merged:
            raise DataError("its assistant turns answer no user turn (the assistant speaks only before the user)")
        turns = tuple(Turn(role, text, meta={} if learn or role == "user" else {"learn": False})
                      for role, text, learn in merged)
        object.__setattr__(self, "turns", turns)
        system = self.system.strip() if isinstance(self.system, str) else None
        object.__setattr__(self, "system", system or None)


# ------------------------------------------------------------------ JSONL


def read_jsonl(path: str | Path) -> list[Dialogue]:
    """The dialogues of a JSONL file, one a line (blank lines skipped); a DataError listing the bad lines."""
    name = str(path)
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{name}: is a folder, not a JSONL file", name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file", name) from None
    except OSError as exc:
        raise DataError(f"{name}: cannot be read ({exc.strerror or exc})", name) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a byte order mark, as some Windows editors write
    dialogues: list[Dialogue] = []
    errors: list[tuple[int, str]] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append((number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                   "save the file as UTF-8"))
            continue
        if not line.strip():
            continue
        try:
            dialogues.append(_dialogue_of_line(line, f"{name}:{number}"))
        except DataError as exc:
            errors.append((number, str(exc)))
    if errors:
        shown = [f"{name}:{number}: {problem}" for number, problem in errors[:ERRORS_SHOWN]]
        if len(errors) > ERRORS_SHOWN:
            shown.append(f"...and {len(errors) - ERRORS_SHOWN} more bad lines")
        raise DataError("\n".join(shown), name, errors[0][0])
    if not dialogues:
        raise DataError(f"{name}: no dialogues in it (it is empty)", name)
    return dialogues


_SHAPE = ('expected a JSON object with "messages" (a list of {"role": ..., "content": ...}) '
          'or "prompt" and "response"')


def _dialogue_of_line(line: str, source: str) -> Dialogue:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{_SHAPE}; got {_kind(record)}")
    if "messages" in record:
        return dialogue_from_messages(record["messages"], source)
    if "prompt" in record:
        if "response" in record and "completion" in record:
            raise DataError('it has both "response" and "completion": keep one')
        key = "response" if "response" in record else "completion"
        if key not in record:
            raise DataError('"prompt" without "response" (or "completion")')
        for part in ("prompt", key):
            if not isinstance(record[part], str):
                raise DataError(f'"{part}" is {_kind(record[part])}, not a string')
        return Dialogue((Turn("user", record["prompt"]), Turn("assistant", record[key])), source=source)
    keys = ", ".join(f'"{key}"' for key in record) or "none"
    raise DataError(f"{_SHAPE}; it has the keys {keys}")


def dialogue_from_messages(messages: Any, source: str = "") -> Dialogue:
    """A Dialogue from OpenAI-style messages (a corpus plugin may use it too); DataError names what is wrong."""
    if not isinstance(messages, list):
        raise DataError(f'"messages" is {_kind(messages)}, not a list')
    if not messages:
        raise DataError('"messages" is an empty list')
    system, turns = None, []
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"message {index} is {_kind(message)}, not an object with \"role\" and \"content\"")
        if "role" not in message:
            raise DataError(f'message {index} has no "role"')
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"message {index} has the role {role!r}; the roles are {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"message {index}'s content is {_kind(content)}, not a string")
        if role == "system":
            if index != 1:
                raise DataError(f"message {index} is a system message; only the first message may be one")
            system = content
        else:
            turns.append(Turn(role, content))
    return Dialogue(tuple(turns), system=system, source=source)


def _kind(value: Any) -> str:
    """A JSON value's type, as the person who wrote the file would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ------------------------------------------------------------------ memory


def from_memory(store: "MemoryStore", settings: "Settings", platform: str | None = None,
                chat: str | None = None) -> list[Dialogue]:
    """Every stored conversation (on `platform`, in chats with id `chat`) with a reply in it, oldest first.

    Read from the store now, so what /forget, /reset and the retention period deleted is not there; and
    what the retention period would delete next, and the personal data `memory.redact` names today, are
    removed again here: the rules may be newer than the lines.
    """
    if not callable(getattr(store, "conversations", None)):
        raise DataError(f"this memory store ({type(store).__name__}) cannot list its conversations (it has no "
                        "conversations() method), so chatforge cannot train on it; upgrade the memory backend")
    kinds = settings.memory.redact
    retention = settings.memory.retention_days
    oldest = time.time() - retention * 86400 if retention else None
    dialogues = []
    for key in store.conversations(platform):
        if chat is not None and key.chat != chat:
            continue
        turns = [Turn(turn.role, pii.redact(turn.text, kinds) if kinds else turn.text,
                      meta={} if _said_by_the_model(turn) else {"learn": False})
                 for turn in _every_turn(store, key) if oldest is None or turn.created_at >= oldest]
        try:
            dialogues.append(Dialogue(tuple(turns), source=f"{MEMORY_SOURCE}{key}"))
        except DataError:
            continue  # no reply in it (a passive chat, or only the bot's side left after a /forget)
    return dialogues


def _said_by_the_model(turn: Turn) -> bool:
    """A user's line, or a reply the generator wrote and nothing changed: what a model may learn to say.

    Replies a plugin wrote (a skill's answer), ones a postprocess hook or the length limit changed, and the
    "…" said when the model gave nothing are kept as context only. Lines stored before chatforge recorded
    a reply's source count as the generator's.
    """
    if turn.role != "assistant":
        return True
    return (turn.meta.get("source", "generator") == "generator" and not turn.meta.get("edited")
            and turn.text.strip() != "…")


def _every_turn(store: "MemoryStore", key: "ConversationKey") -> list[Turn]:
    """The whole conversation. `recent` gives the newest turns: ask for more than `count` until fewer come back,
    so that a turn added meanwhile cannot push the first one out."""
    limit = store.count(key) + 64
    for _ in range(32):
        turns = store.recent(key, limit)
        if len(turns) < limit:
            return turns
        limit *= 2
    return turns


# ------------------------------------------------------------------ corpora


@dataclass(frozen=True)
class Corpus:
    """A corpus a plugin registered: loaded only when `load()` is called."""

    name: str
    description: str
    licence: str
    plugin: str
    """The plugin that registered it."""
    loader: Callable[[], Iterable[Dialogue]] = field(repr=False)

    def load(self, limit: int | None = None) -> list[Dialogue]:
        """The corpus's dialogues (the first `limit`); a DataError, naming the corpus and plugin, if it fails."""
        where = f"corpus {self.name!r} (plugin {self.plugin!r})"
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataError(f"{where}: the limit must be a positive whole number, not {limit!r}")
        try:
            produced = self.loader()
        except Exception as exc:  # noqa: BLE001 - the plugin's failure, told in one line
            raise _load_failure(where, exc) from None
        if produced is None or isinstance(produced, (str, bytes, dict)) or not hasattr(produced, "__iter__"):
            raise DataError(f"{where} gave {produced!r:.80}, not an iterable of Dialogues")
        try:
            dialogues = list(itertools.islice(produced, limit))  # a generator's work happens here
        except Exception as exc:  # noqa: BLE001
            raise _load_failure(where, exc) from None
        for dialogue in dialogues:
            if not isinstance(dialogue, Dialogue):
                raise DataError(f"{where} gave {dialogue!r:.80}, not a Dialogue (chatforge.finetune_data.Dialogue)")
        return dialogues


def _load_failure(where: str, exc: Exception) -> DataError:
    from .skill import SkillError

    if isinstance(exc, (DataError, SkillError)):  # a Dialogue it could not build; chatforge.require's advice
        return DataError(f"{where}: {exc}")
    return DataError(f"{where} could not be loaded: {type(exc).__name__}: {exc}")


def dialogue_corpora(plugin_host: "PluginHost") -> dict[str, Corpus]:
    """The corpora every loaded plugin registers, by name (none is loaded yet).

    A registration with bad arguments is that plugin's failure (reported like any, the others stay); one name
    registered twice is a DataError naming both plugins: training on the wrong data would be worse.
    """
    from .plugin_manager import PerPlugin

    registered: list[Corpus] = []

    def register_for(plugin: str) -> Callable[..., None]:
        def register(name: str, load: Callable[[], Iterable[Dialogue]], description: str, licence: str) -> None:
            if not isinstance(name, str) or not CORPUS_NAME.match(name):
                raise ValueError(f"corpus name {name!r}: use 1-40 lowercase letters, digits, - or _")
            if not callable(load):
                raise ValueError(f"corpus {name!r}: load must be a function returning Dialogues, not {load!r}")
            for what, value in (("description", description), ("licence", licence)):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"corpus {name!r}: give its {what} (a non-empty string)")
            registered.append(Corpus(name, description.strip(), licence.strip(), plugin, load))
        return register

    plugin_host.call("chatforge_register_dialogue_corpora", register=PerPlugin(register_for))
    corpora: dict[str, Corpus] = {}
    for corpus in registered:
        first = corpora.setdefault(corpus.name, corpus)
        if first is not corpus:
            if first.plugin == corpus.plugin:
                raise DataError(f"the corpus {corpus.name!r} is registered twice by plugin {corpus.plugin!r}")
            raise DataError(f"the corpus {corpus.name!r} is registered by two plugins, {first.plugin!r} and "
                            f"{corpus.plugin!r}; disable one (plugins.{corpus.plugin}.enabled: false) or ask its "
                            "author to rename it")
    return corpora


# ------------------------------------------------------------------ held-out split


def split_held_out(dialogues: list[Dialogue], fraction: float, seed: int) -> tuple[list[Dialogue], list[Dialogue]]:
    """(train, held out): `fraction` of the dialogues held out, at least one on each side, each list in the
    given order.

    Whole dialogues go to one side, chosen by a hash of the seed and the dialogue's content: the same for a
    seed whatever the order or the other dialogues, and a dialogue present twice is never on both sides. A
    conversation from memory is ranked by its key instead, as its content grows with every turn: one held
    out stays held out when it goes on (and the next run trains on data that grew meanwhile).
    """
    if not 0 < fraction < 1:
        raise DataError(f"the held-out fraction must be between 0 and 1 (exclusive), not {fraction}")
    if len(dialogues) < 2:
        given = f"{len(dialogues)} was given" if dialogues else "none was given"
        raise DataError(f"measuring held-out perplexity needs at least two dialogues (one to train on, one to "
                        f"hold out); {given}")
    held_count = min(len(dialogues) - 1, max(1, round(fraction * len(dialogues))))
    ranked = sorted(range(len(dialogues)), key=lambda index: (_rank(dialogues[index], seed), index))
    held = set(ranked[:held_count])
    return ([d for index, d in enumerate(dialogues) if index not in held],
            [d for index, d in enumerate(dialogues) if index in held])


def _rank(dialogue: Dialogue, seed: int) -> str:
    if dialogue.source.startswith(MEMORY_SOURCE):
        content = json.dumps([seed, dialogue.source], ensure_ascii=False)
    else:
        content = json.dumps([seed, dialogue.system, [[turn.role, turn.text] for turn in dialogue.turns]],
                             ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()
