"""Dialogue corpora shipped with chatforge for `chatforge finetune --corpus NAME`; a plugin like any other.

`chitchat`: the BYU PCC Lab's Chit-Chat Challenge, 7,168 English small-talk conversations between two people
(the `chitchat-dataset` package, MIT, 39 MB of JSON: `pip install chitchat-dataset`, or chatforge's `dialogue`
extra). Its layout: `{id: {"messages": [[{"text", "timestamp", "sender"}, ...], ...], ...}}`, each inner list
one turn of one speaker, in several utterances. The first speaker is the user, the other the assistant; a
turn's utterances are its lines. The package is imported and the file read only when the corpus is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from chatforge import hookimpl, require
from chatforge.finetune_data import DataError, Dialogue
from chatforge.memory import Turn

LICENCE = "MIT (chitchat-dataset, BYU PCC Lab)"


def dataset_file(package: ModuleType) -> Path:
    """Where the package keeps its JSON (a function so that tests can point it at a slice)."""
    return Path(package.__file__).parent / "dataset.json"


def load_chitchat() -> Iterator[Dialogue]:
    package = require("chitchat_dataset", "pip install chitchat-dataset")
    return chitchat_dialogues(json.loads(dataset_file(package).read_text(encoding="utf-8")))


def chitchat_dialogues(data: dict[str, Any]) -> Iterator[Dialogue]:
    """The conversations of the parsed JSON that have a reply in them, in the file's order."""
    for key, conversation in data.items():
        messages = conversation.get("messages") or []
        if not messages or not messages[0]:
            continue
        first_speaker = messages[0][0]["sender"]
        turns = tuple(Turn("user" if turn[0]["sender"] == first_speaker else "assistant",
                           "\n".join(u["text"].strip() for u in turn if u["text"].strip()))
                      for turn in messages if turn)
        try:
            yield Dialogue(turns, source=f"corpus:chitchat/{key}")
        except DataError:
            continue  # one speaker only (3,150 of the conversations are a single turn)


@hookimpl
def chatforge_register_dialogue_corpora(register) -> None:
    register("chitchat", load_chitchat,
             description="English small talk between people, 7,168 conversations (BYU PCC Lab's Chit-Chat "
                         "Challenge); the first speaker is the user",
             licence=LICENCE)
