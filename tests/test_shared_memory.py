"""Shared memories (`memory.scope: chat`): each person controls their own lines, and the bot's replies to them.

A group shares one conversation. A member's /reset forgets only their lines
and the replies to them; an admin's clears it for everyone; /history names
each speaker; /forget takes the bot's replies to the person along with their
lines. Each test runs on both memory backends.
"""

from __future__ import annotations

import asyncio

import pytest

from chatforge.memory import InMemoryMemory
from chatforge.sqlite_memory import SQLiteMemory
from chatforge.testing import make_bot

GROUP = {"chat": "group", "direct": False}


@pytest.fixture(params=["memory", "sqlite"])
def memory(request, tmp_path):
    store = InMemoryMemory() if request.param == "memory" else SQLiteMemory(tmp_path / "memory.sqlite3")
    yield store
    store.close()


def shared_bot(memory, admins=(), **defaults):
    config = {"memory": {"scope": "chat"}, "bot": {"admins": list(admins)}}
    return make_bot(config, memory=memory, **{**GROUP, **defaults})


def talk(bot, *lines):
    """Send (user, text) pairs in order; the replies' texts."""
    async def run():
        return [await bot.ask_async(text, user=user, display_name=user.capitalize()) for user, text in lines]
    return asyncio.run(run())


def texts(bot, **fields):
    return [turn.text for turn in bot.history(**fields)]


def test_a_members_reset_in_a_group_forgets_only_their_turns_and_says_so(memory):
    bot = shared_bot(memory)
    *_, reset = talk(bot, ("ann", "from ann"), ("bob", "from bob"), ("ann", "/reset"))
    assert texts(bot) == ["from bob", "echo: from bob"]
    assert reset == ("Done: I forgot your 2 turns of this shared conversation; other people's turns stay "
                     "(an admin's /reset clears it for everyone).")


def test_a_members_reset_with_nothing_of_theirs_says_so(memory):
    bot = shared_bot(memory)
    _, reset = talk(bot, ("bob", "from bob"), ("ann", "/reset"))
    assert reset == "There was nothing of yours to forget in this shared conversation."
    assert texts(bot) == ["from bob", "echo: from bob"]


def test_an_admins_reset_in_a_group_clears_it_for_everyone(memory):
    bot = shared_bot(memory, admins=["test:boss"])
    *_, reset = talk(bot, ("ann", "from ann"), ("bob", "from bob"), ("boss", "/reset"))
    assert reset == "Done: I forgot this shared conversation for everyone (4 turns)."
    assert texts(bot) == []


def test_reset_in_a_private_chat_clears_everything_as_before(memory):
    bot = shared_bot(memory, chat="dm-ann", direct=True)
    _, reset = talk(bot, ("ann", "hello"), ("ann", "/reset"))
    assert reset == "Done: I forgot this conversation (2 turns)."
    assert texts(bot) == []


def test_history_in_a_group_names_each_speaker(memory):
    bot = shared_bot(memory)
    *_, shown = talk(bot, ("ann", "from ann"), ("bob", "from bob"), ("ann", "/history"))
    assert shown.splitlines() == ["I remember 4 turns of this conversation:",
                                  "You: from ann", "chatforge: echo: from ann",
                                  "Bob: from bob", "chatforge: echo: from bob"]


def test_history_all_shows_the_bots_replies_to_the_person_and_no_one_elses(memory):
    bot = shared_bot(memory)
    *_, shown = talk(bot, ("ann", "from ann"), ("bob", "from bob"), ("ann", "/history all"))
    lines = shown.splitlines()
    assert lines[0] == "Everything I keep about you on test (2 turns):"
    assert lines[1] == "[chat group]"
    assert lines[2].endswith(" You: from ann") and lines[3].endswith(" chatforge: echo: from ann")
    assert "bob" not in shown


def test_forget_in_a_private_chat_deletes_the_bots_replies_too(memory):
    bot = shared_bot(memory, chat="dm-ann", direct=True)
    _, forgotten = talk(bot, ("ann", "my secret"), ("ann", "/forget"))
    assert forgotten == "Done: I deleted everything I kept about you on test (2 turns)."
    assert texts(bot) == []


def test_forget_in_a_group_deletes_the_replies_to_the_person_and_keeps_the_others(memory):
    bot = shared_bot(memory)
    *_, forgotten = talk(bot, ("ann", "from ann"), ("bob", "from bob"), ("ann", "/forget"))
    assert forgotten == "Done: I deleted everything I kept about you on test (2 turns)."
    assert texts(bot) == ["from bob", "echo: from bob"]
