"""What `chatforge finetune` trains on (chatforge.finetune_data): JSONL files, the bot's own memory, corpora.

JSONL errors name FILE:LINE and what is wrong; memory is read from a real SQLite store after real /forget and
/reset commands, with today's `memory.redact` applied again; corpora come from plugins (the built-in chitchat
corpus is loaded once for the whole module: its JSON is 39 MB); the held-out split is by dialogue.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatforge.config import load_settings_from_dict
from chatforge.conversation import ConversationKey
from chatforge.finetune_data import (Corpus, DataError, Dialogue, dialogue_corpora, from_memory, read_jsonl,
                                     split_held_out)
from chatforge.hookspecs import hookimpl
from chatforge.memory import InMemoryMemory, Turn
from chatforge.plugin_manager import PluginHost
from chatforge.sqlite_memory import SQLiteMemory
from chatforge.testing import make_bot


def write(path: Path, *lines: object) -> Path:
    """A JSONL file: dicts are dumped, strings written as they are."""
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                              for line in lines) + "\n", encoding="utf-8")
    return path


def pairs(dialogue: Dialogue) -> list[tuple[str, str]]:
    return [(turn.role, turn.text) for turn in dialogue.turns]


def all_texts(dialogues: list[Dialogue]) -> str:
    return "\n".join(turn.text for dialogue in dialogues for turn in dialogue.turns)


# ------------------------------------------------------------------ Dialogue


def test_a_dialogue_merges_same_role_turns_and_keeps_only_whole_exchanges():
    dialogue = Dialogue((Turn("assistant", "Welcome!"), Turn("user", "hi"), Turn("user", " there "),
                         Turn("assistant", "hello"), Turn("assistant", ""), Turn("assistant", "how are you?"),
                         Turn("user", "fine"), Turn("user", "and you?")), source="x")
    assert pairs(dialogue) == [("user", "hi\nthere"), ("assistant", "hello\nhow are you?")]
    assert dialogue.source == "x" and dialogue.system is None
    assert all(turn.user == "" and turn.created_at == 0.0 for turn in dialogue.turns)


def test_a_dialogue_without_a_reply_to_a_user_turn_is_refused():
    with pytest.raises(DataError, match="no assistant turn"):
        Dialogue((Turn("user", "anyone?"),))
    with pytest.raises(DataError, match="answer no user turn"):
        Dialogue((Turn("assistant", "I speak first"), Turn("user", "and last")))
    with pytest.raises(DataError, match="not a chatforge.memory.Turn"):
        Dialogue(({"role": "user", "content": "hi"},))  # type: ignore[arg-type]


# ------------------------------------------------------------------ read_jsonl


def test_read_jsonl_reads_both_formats_with_their_line_numbers(tmp_path):
    path = write(tmp_path / "data.jsonl",
                 {"messages": [{"role": "system", "content": "You are terse."},
                               {"role": "user", "content": "Capital of France?"},
                               {"role": "assistant", "content": "Paris."},
                               {"role": "user", "content": "And Italy?"},
                               {"role": "assistant", "content": "Rome."}]},
                 "",
                 "   ",
                 {"prompt": "2+2?", "response": "4"},
                 {"prompt": "Say hi in French", "completion": "Bonjour", "id": 17},
                 {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！🙂"}]})
    first, second, third, fourth = read_jsonl(path)
    assert first.system == "You are terse."
    assert pairs(first) == [("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And Italy?"),
                            ("assistant", "Rome.")]
    assert pairs(second) == [("user", "2+2?"), ("assistant", "4")] and second.system is None
    assert pairs(third) == [("user", "Say hi in French"), ("assistant", "Bonjour")]
    assert pairs(fourth) == [("user", "你好"), ("assistant", "你好！🙂")]
    assert [d.source for d in (first, second, third, fourth)] == [f"{path}:{n}" for n in (1, 4, 5, 6)]


def test_read_jsonl_merges_same_role_messages_drops_a_trailing_question_and_takes_a_bom(tmp_path):
    path = tmp_path / "chat.jsonl"
    line = {"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"},
                         {"role": "assistant", "content": "three"}, {"role": "user", "content": "unanswered"}]}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line).encode() + b"\r\n")
    [dialogue] = read_jsonl(path)
    assert pairs(dialogue) == [("user", "one\ntwo"), ("assistant", "three")]


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('[1, 2]', 'a JSON object with "messages"'),
    ({"text": "hello"}, 'a JSON object with "messages"'),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has the role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
     "message 2 has the role 'tool'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]},
     "message 2's content is a number, not a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "message 1's content is a list, not a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]},
     "message 2 is a system message"),
    ({"messages": []}, '"messages" is an empty list'),
    ({"messages": "hi"}, '"messages" is a string, not a list'),
    ({"messages": ["hi"]}, "message 1 is a string, not an object"),
    ({"messages": [{"content": "hi"}]}, 'message 1 has no "role"'),
    ({"prompt": "hi"}, '"response" (or "completion")'),
    ({"prompt": "hi", "response": None}, '"response" is null, not a string'),
    ({"prompt": 3, "response": "three"}, '"prompt" is a number, not a string'),
    ({"prompt": "hi", "response": "a", "completion": "b"}, 'both "response" and "completion"'),
    ({"prompt": "hi", "response": "   "}, "no assistant turn"),
])
def test_a_bad_line_is_named_with_its_file_and_line_and_what_is_wrong(tmp_path, line, problem):
    path = write(tmp_path / "bad.jsonl", {"prompt": "fine", "response": "ok"}, "", line)
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: "), message
    assert problem in message, message
    assert caught.value.path == str(path) and caught.value.line == 3
    assert "Traceback" not in message and "\n" not in message


def test_several_bad_lines_are_listed_together_up_to_five(tmp_path):
    lines = [{"prompt": f"q{n}", "response": 1} if n % 2 else {"prompt": f"q{n}", "response": "a"} for n in range(20)]
    path = write(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    shown = str(caught.value).splitlines()
    assert [line.split(": ", 1)[0] for line in shown[:5]] == [f"{path}:{n}" for n in (2, 4, 6, 8, 10)]
    assert shown[5] == "...and 5 more bad lines"
    assert caught.value.line == 2


def test_a_missing_file_a_folder_an_empty_file_and_bytes_that_are_not_utf8(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl: no such file"):
        read_jsonl(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match="is a folder, not a JSONL file"):
        read_jsonl(tmp_path)
    with pytest.raises(DataError, match=r"empty\.jsonl: no dialogues in it \(it is empty\)"):
        read_jsonl(write(tmp_path / "empty.jsonl", "", ""))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"prompt": "ok", "response": "fine"}).encode() + b"\n"
                       + '{"prompt": "café", "response": "oui"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as caught:
        read_jsonl(latin1)
    assert str(caught.value).startswith(f"{latin1}:2: not UTF-8 text (byte 0xe9 at column 16)"), str(caught.value)


def test_real_dialogues_written_as_jsonl_read_back_unchanged(tmp_path, chitchat):
    """The chitchat corpus's first 200 dialogues, as an exporter would write them."""
    sample = chitchat[:200]
    lines = []
    for index, dialogue in enumerate(sample):
        messages = [{"role": turn.role, "content": turn.text} for turn in dialogue.turns]
        lines.append({"messages": messages} if index % 3 else {"messages": [{"role": "system", "content": "Chat."},
                                                                            *messages]})
    back = read_jsonl(write(tmp_path / "chitchat.jsonl", *lines))
    assert [pairs(d) for d in back] == [pairs(d) for d in sample]
    assert [d.system for d in back] == [None if index % 3 else "Chat." for index in range(len(sample))]


# ------------------------------------------------------------------ from_memory


@pytest.fixture
def sqlite_store(tmp_path):
    store = SQLiteMemory(tmp_path / "memory.sqlite3")
    yield store
    store.close()


def talk(bot, lines: list[tuple[str, dict]]) -> None:
    for text, where in lines:
        assert bot.ask(text, **where) is not None


@pytest.fixture
def stored(tmp_path):
    """Train later, as `chatforge finetune` does: open the memory file again once the bot has closed it."""
    opened = []

    def reopen() -> SQLiteMemory:
        opened.append(SQLiteMemory(tmp_path / "memory.sqlite3"))
        return opened[-1]

    yield reopen
    for store in opened:
        store.close()


def test_what_forget_and_reset_deleted_is_not_trained_on(stored):
    bot = make_bot(memory=stored())
    try:
        talk(bot, [("ann asks about tea", {"user": "ann", "chat": "ann-dm"}),
                   ("ann asks about coffee", {"user": "ann", "chat": "ann-dm"}),
                   ("bob wants a joke", {"user": "bob", "chat": "bob-dm"}),
                   ("bob in the other chat", {"user": "bob", "chat": "club"}),
                   ("carol says hello", {"user": "carol", "chat": "club"}),
                   ("ann on another platform", {"user": "ann", "chat": "ann-dm", "platform": "elsewhere"})])
        before = from_memory(bot.memory, bot.engine.settings)
        assert "ann asks about tea" in all_texts(before) and "echo: bob wants a joke" in all_texts(before)
        assert bot.ask("/forget", user="ann", chat="ann-dm").startswith("Done: I deleted everything")
        assert bot.ask("/reset", user="bob", chat="bob-dm").startswith("Done: I forgot this conversation")
    finally:
        bot.close()
    after = from_memory(stored(), bot.engine.settings)
    text = all_texts(after)
    for gone in ("ann asks about tea", "echo: ann asks about tea", "ann asks about coffee", "bob wants a joke",
                 "echo: bob wants a joke", "/forget", "/reset"):
        assert gone not in text, gone
    assert sorted(pairs(d) for d in after) == sorted([
        [("user", "bob in the other chat"), ("assistant", "echo: bob in the other chat")],
        [("user", "carol says hello"), ("assistant", "echo: carol says hello")],
        [("user", "ann on another platform"), ("assistant", "echo: ann on another platform")]])  # /forget: one platform


def test_in_a_shared_conversation_a_forgotten_member_and_the_replies_to_them_are_gone(stored):
    bot = make_bot({"memory": {"scope": "chat"}}, memory=stored(), chat="group")
    try:
        talk(bot, [("dave: good morning", {"user": "dave"}), ("ann: my secret plan", {"user": "ann"}),
                   ("dave: lunch at noon?", {"user": "dave"})])
        bot.ask("/forget", user="ann")
    finally:
        bot.close()
    [dialogue] = from_memory(stored(), bot.engine.settings)
    assert pairs(dialogue) == [("user", "dave: good morning"), ("assistant", "echo: dave: good morning"),
                               ("user", "dave: lunch at noon?"), ("assistant", "echo: dave: lunch at noon?")]
    assert dialogue.source == "memory:test/group"


def test_only_what_the_model_said_unchanged_is_learnt_from_memory(stored):
    """A skill's answer, a reply a postprocess hook changed, and "…" are context for what follows, never
    taught; nor is a reply the length limit cut."""
    @hookimpl
    def chatforge_handle_text(message):
        return "It is sunny." if "weather" in message.text else None

    @hookimpl
    def chatforge_postprocess(reply):
        return reply.text + " (edited)" if "edit me" in reply.text else None

    plugins = {"weather": SimpleNamespace(chatforge_handle_text=chatforge_handle_text),
               "editor": SimpleNamespace(chatforge_postprocess=chatforge_postprocess)}
    bot = make_bot({"limits": {"max_reply_chars": 100}}, plugins=plugins, memory=stored())
    try:
        talk(bot, [("how is the weather?", {}), ("please edit me", {}), ("plain question", {}),
                   ("long " * 40, {})])
    finally:
        bot.close()
    [dialogue] = from_memory(stored(), bot.engine.settings)
    learnt = [(turn.text[:22], turn.meta.get("learn", True)) for turn in dialogue.turns if turn.role == "assistant"]
    assert learnt == [("It is sunny.", False), ("echo: please edit me (", False), ("echo: plain question", True),
                      ("echo: long long long l", False)]


def test_merged_replies_are_learnt_only_if_every_part_is():
    turns = (Turn("user", "hi"), Turn("assistant", "a skill said this", meta={"learn": False}),
             Turn("assistant", "then the model"), Turn("user", "ok"), Turn("assistant", "fine"))
    dialogue = Dialogue(turns)
    assert [(t.text, t.meta) for t in dialogue.turns] == [
        ("hi", {}), ("a skill said this\nthen the model", {"learn": False}), ("ok", {}), ("fine", {})]


def test_personal_data_is_redacted_by_todays_rules_even_if_stored_before_them(stored):
    bot = make_bot(memory=stored())  # no memory.redact yet: the lines are stored as written
    try:
        talk(bot, [("write to ann.lee@example.org please", {}), ("call me on +44 20 7946 0958", {}),
                   ("my card 4111 1111 1111 1111", {})])
    finally:
        bot.close()
    sqlite_store = stored()
    raw = all_texts([Dialogue(tuple(sqlite_store.recent(key, 100))) for key in sqlite_store.conversations()])
    assert "ann.lee@example.org" in raw and "+44 20 7946 0958" in raw  # the store still holds them
    settings = load_settings_from_dict({"memory": {"redact": ["email", "phone"]}})
    text = all_texts(from_memory(sqlite_store, settings))
    assert "ann.lee@example.org" not in text and "7946" not in text
    assert "write to [email] please" in text and "echo: call me on [phone]" in text
    cards = all_texts(from_memory(sqlite_store, load_settings_from_dict({"memory": {"redact": ["card"]}})))
    assert "my card [card]" in cards and "4111" not in cards and "ann.lee@example.org" in cards  # only today's kinds


def test_the_platform_and_chat_filters(sqlite_store):
    settings = load_settings_from_dict({})
    for platform, chat, user in [("telegram", "1", "a"), ("telegram", "1", "b"), ("telegram", "2", "a"),
                                 ("discord", "1", "a")]:
        sqlite_store.add(ConversationKey(platform, chat, None, user),
                         Turn("user", f"{platform} {chat} {user}", user=user),
                         Turn("assistant", "ok", reply_to=user))

    def found(**filters) -> list[str]:
        return sorted(d.turns[0].text for d in from_memory(sqlite_store, settings, **filters))

    assert found() == ["discord 1 a", "telegram 1 a", "telegram 1 b", "telegram 2 a"]
    assert found(platform="telegram") == ["telegram 1 a", "telegram 1 b", "telegram 2 a"]
    assert found(chat="1") == ["discord 1 a", "telegram 1 a", "telegram 1 b"]
    assert found(platform="telegram", chat="2") == ["telegram 2 a"]
    assert found(platform="slack") == []
    sources = [d.source for d in from_memory(sqlite_store, settings)]
    assert sources == ["memory:telegram/1 (a)", "memory:telegram/1 (b)", "memory:telegram/2 (a)",
                       "memory:discord/1 (a)"]


def test_turns_past_the_retention_period_are_not_trained_on_and_one_sided_chats_are_skipped(sqlite_store):
    now = time.time()
    key = ConversationKey("test", "c", None, "u")
    sqlite_store.add(key, Turn("user", "very old", now - 40 * 86400, "u"),
                     Turn("assistant", "old reply", now - 40 * 86400, reply_to="u"))
    sqlite_store.add(key, Turn("user", "recent", now - 86400, "u"), Turn("assistant", "recent reply", now, reply_to="u"))
    sqlite_store.add(ConversationKey("test", "silent", None, "u"), Turn("user", "nobody answered", now, "u"))
    [dialogue] = from_memory(sqlite_store, load_settings_from_dict({"memory": {"retention_days": 30}}))
    assert pairs(dialogue) == [("user", "recent"), ("assistant", "recent reply")]
    [kept] = from_memory(sqlite_store, load_settings_from_dict({}))
    assert [t.text for t in kept.turns] == ["very old", "old reply", "recent", "recent reply"]


def test_a_long_conversation_is_read_whole_and_in_order():
    store = InMemoryMemory()
    key = ConversationKey("test", "long", None, "u")
    for index in range(300):
        store.add(key, Turn("user", f"q{index}", 1000.0 + index, "u"), Turn("assistant", f"a{index}", 1000.0 + index))
    [dialogue] = from_memory(store, load_settings_from_dict({}))
    assert [t.text for t in dialogue.turns] == [text for index in range(300) for text in (f"q{index}", f"a{index}")]


def test_a_store_that_cannot_list_its_conversations_is_refused_politely():
    class OldStore:
        def recent(self, key, limit):
            return []

    with pytest.raises(DataError, match="OldStore.*cannot list its conversations"):
        from_memory(OldStore(), load_settings_from_dict({}))


# ------------------------------------------------------------------ corpora


def corpus_plugin(name: str, dialogues, calls: list | None = None, **extra):
    """A plugin registering one corpus whose load() records that it was called."""
    class Plugin:
        @hookimpl
        def chatforge_register_dialogue_corpora(self, register):
            def load():
                if calls is not None:
                    calls.append(name)
                return iter(dialogues)
            register(name, load, description=extra.get("description", f"the {name} set"),
                     licence=extra.get("licence", "CC0"))
    return Plugin()


def host_with(**plugins) -> PluginHost:
    host = PluginHost(load_settings_from_dict({}))
    assert host.load(extra_plugins=plugins) == []
    return host


HELLO = Dialogue((Turn("user", "hello"), Turn("assistant", "hi!")), source="corpus:greetings/1")


def test_plugins_register_corpora_which_load_only_when_asked(tmp_path):
    calls: list[str] = []
    host = host_with(greetings=corpus_plugin("greetings", [HELLO] * 5, calls),
                     other=corpus_plugin("quotes", [HELLO], calls, licence="MIT", description="famous lines"))
    corpora = dialogue_corpora(host)
    assert {"greetings", "quotes", "chitchat"} <= set(corpora)
    assert calls == []
    quotes = corpora["quotes"]
    assert isinstance(quotes, Corpus)
    assert (quotes.name, quotes.plugin, quotes.licence, quotes.description) == ("quotes", "other", "MIT", "famous lines")
    assert corpora["greetings"].load() == [HELLO] * 5 and calls == ["greetings"]
    assert corpora["greetings"].load(limit=2) == [HELLO] * 2


def test_two_plugins_registering_one_corpus_name_are_both_named():
    host = host_with(first=corpus_plugin("greetings", [HELLO]), second=corpus_plugin("greetings", [HELLO]))
    with pytest.raises(DataError) as caught:
        dialogue_corpora(host)
    message = str(caught.value)
    assert "'greetings'" in message and "'first'" in message and "'second'" in message, message
    assert "plugins.second.enabled: false" in message or "plugins.first.enabled: false" in message, message


def test_a_bad_registration_is_that_plugins_failure_and_the_others_stay():
    class Bad:
        @hookimpl
        def chatforge_register_dialogue_corpora(self, register):
            register("Has Spaces", lambda: [], description="x", licence="MIT")

    class NoLicence:
        @hookimpl
        def chatforge_register_dialogue_corpora(self, register):
            register("nolicence", lambda: [], description="x", licence="")

    class NotCallable:
        @hookimpl
        def chatforge_register_dialogue_corpora(self, register):
            register("data", "data.jsonl", description="x", licence="MIT")

    host = host_with(bad=Bad(), nolicence=NoLicence(), notcallable=NotCallable(), good=corpus_plugin("fine", [HELLO]))
    corpora = dialogue_corpora(host)
    assert "fine" in corpora and not {"Has Spaces", "nolicence", "data"} & set(corpora)
    errors = {info.name: " ".join(info.errors) for info in host.failures}
    assert "corpus name 'Has Spaces'" in errors["bad"]
    assert "licence" in errors["nolicence"]
    assert "load must be a function" in errors["notcallable"]


def test_a_corpus_that_fails_to_load_or_gives_something_else_is_a_data_error():
    def broken():
        raise FileNotFoundError(2, "No such file or directory", "/data/corpus.json")

    class Plugin:
        @hookimpl
        def chatforge_register_dialogue_corpora(self, register):
            register("broken", broken, description="x", licence="MIT")
            register("strings", lambda: ["just text"], description="x", licence="MIT")
            register("nothing", lambda: None, description="x", licence="MIT")
            register("one-sided", lambda: (Dialogue((Turn("user", "hello?"),)) for _ in range(3)),
                     description="x", licence="MIT")

    corpora = dialogue_corpora(host_with(mine=Plugin()))
    with pytest.raises(DataError, match=r"corpus 'broken' \(plugin 'mine'\) could not be loaded: FileNotFoundError"):
        corpora["broken"].load()
    with pytest.raises(DataError, match=r"corpus 'strings' \(plugin 'mine'\) gave 'just text', not a Dialogue"):
        corpora["strings"].load()
    with pytest.raises(DataError, match=r"corpus 'nothing' \(plugin 'mine'\) gave None"):
        corpora["nothing"].load()
    with pytest.raises(DataError, match=r"^corpus 'one-sided' \(plugin 'mine'\): no assistant turn"):
        corpora["one-sided"].load()
    for limit in (0, -1, 2.5, "3"):
        with pytest.raises(DataError, match=f"limit must be a positive whole number, not {limit!r}"):
            corpora["broken"].load(limit=limit)


def test_a_corpus_needing_a_package_that_is_missing_says_what_to_install():
    from chatforge import require

    class Plugin:
        @hookimpl
        def chatforge_register_dialogue_corpora(self, register):
            register("absent", lambda: require("chatforge_no_such_dataset", "pip install no-such-dataset"),
                     description="x", licence="MIT")

    with pytest.raises(DataError, match=r"corpus 'absent'.*'chatforge_no_such_dataset'.*pip install no-such-dataset"):
        dialogue_corpora(host_with(mine=Plugin()))["absent"].load()


@pytest.fixture(scope="module")
def chitchat_raw() -> dict:
    """The chitchat JSON as the package ships it: read once for the module (39 MB, about a second)."""
    import chitchat_dataset

    return json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chitchat(chitchat_raw) -> list[Dialogue]:
    """Every chitchat dialogue, through the built-in plugin's own loader (on the JSON read once above)."""
    from chatforge.plugins import dialogues

    return list(dialogues.chitchat_dialogues(chitchat_raw))


def expected_chitchat_turns(conversation: dict) -> list[tuple[str, str]]:
    """What a chitchat conversation should become: the first speaker is the user, each turn's non-empty
    utterances one per line; turns of one speaker in a row (after an empty turn) become one; whole exchanges."""
    speakers = [turn[0]["sender"] for turn in conversation["messages"]]
    turns: list[list] = []
    for turn, speaker in zip(conversation["messages"], speakers):
        text = "\n".join(u["text"].strip() for u in turn if u["text"].strip())
        if not text:
            continue
        role = "user" if speaker == speakers[0] else "assistant"
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    while turns and turns[0][0] != "user":
        turns.pop(0)
    while turns and turns[-1][0] != "assistant":
        turns.pop()
    return [tuple(turn) for turn in turns]


def test_the_builtin_chitchat_corpus_is_registered_with_its_licence():
    corpus = dialogue_corpora(host_with())["chitchat"]
    assert corpus.licence == "MIT (chitchat-dataset, BYU PCC Lab)"
    assert corpus.plugin == "dialogues" and "BYU" in corpus.description


def test_chitchat_becomes_dialogues_speaker_by_speaker(chitchat, chitchat_raw):
    expected = {f"corpus:chitchat/{key}": expected_chitchat_turns(value) for key, value in chitchat_raw.items()}
    expected = {source: turns for source, turns in expected.items() if turns}
    assert len(expected) > 3900  # every conversation with a reply (3,150 of 7,168 have one turn only)
    assert {d.source: pairs(d) for d in chitchat} == expected
    assert len({d.source for d in chitchat}) == len(chitchat)
    for dialogue in chitchat:
        roles = [turn.role for turn in dialogue.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2), dialogue.source


def test_chitchat_loads_lazily_through_the_plugin_with_a_limit(chitchat_raw, tmp_path, monkeypatch):
    """The real load path (require, reading the file, the limit), on a slice of the file: the whole file is read
    once, above."""
    from chatforge.plugins import dialogues

    keys = list(chitchat_raw)[:40]
    small = tmp_path / "dataset.json"
    small.write_text(json.dumps({key: chitchat_raw[key] for key in keys}), encoding="utf-8")
    monkeypatch.setattr(dialogues, "dataset_file", lambda package: small)
    corpus = dialogue_corpora(host_with())["chitchat"]
    wanted = [f"corpus:chitchat/{key}" for key in keys if expected_chitchat_turns(chitchat_raw[key])]
    assert [d.source for d in corpus.load()] == wanted
    assert [d.source for d in corpus.load(limit=3)] == wanted[:3]


def test_the_dataset_package_is_needed_only_to_load_the_corpus(monkeypatch):
    """The plugin is imported afresh with chitchat_dataset absent: it still registers the corpus, and loading
    it says what to install."""
    monkeypatch.delitem(sys.modules, "chatforge.plugins.dialogues")
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # `import chitchat_dataset` now fails
    host = host_with()
    assert host.infos["dialogues"].loaded, host.infos["dialogues"].errors
    corpus = dialogue_corpora(host)["chitchat"]
    with pytest.raises(DataError, match=r"corpus 'chitchat' \(plugin 'dialogues'\): .*'chitchat_dataset'.*"
                                        r"pip install chitchat-dataset"):
        corpus.load()


def test_the_data_half_imports_no_torch():
    """Data is read and checked before a model is loaded: `chatforge finetune` refuses bad data at once."""
    code = ("import sys, chatforge.finetune_data, chatforge.plugins.dialogues\n"
            "print('torch' in sys.modules, 'chitchat_dataset' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ split_held_out


def numbered(count: int) -> list[Dialogue]:
    return [Dialogue((Turn("user", f"question {n}"), Turn("assistant", f"answer {n}")), source=f"d:{n}")
            for n in range(count)]


def test_the_split_is_by_dialogue_deterministic_and_of_the_asked_size():
    dialogues = numbered(100)
    train, held = split_held_out(dialogues, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert sorted([d.source for d in train + held], key=lambda s: int(s[2:])) == [d.source for d in dialogues]
    assert [d.source for d in train] == [d.source for d in dialogues if d not in held]  # order kept
    assert split_held_out(dialogues, 0.1, seed=0) == (train, held)
    shuffled = dialogues[:]
    random.Random(5).shuffle(shuffled)
    assert {d.source for d in split_held_out(shuffled, 0.1, seed=0)[1]} == {d.source for d in held}
    others = [{d.source for d in split_held_out(dialogues, 0.1, seed=seed)[1]} for seed in range(1, 6)]
    assert any(other != {d.source for d in held} for other in others)


def test_a_dialogue_seen_twice_falls_on_one_side():
    dialogues = numbered(30) + numbered(30)
    for seed in range(5):
        train, held = split_held_out(dialogues, 0.2, seed)
        assert not {pairs(d)[0] for d in train} & {pairs(d)[0] for d in held}


def test_a_conversation_from_memory_held_out_stays_held_out_as_it_goes_on(sqlite_store):
    """Ranked by content, a conversation that grew by one turn would move to the training side half the time:
    the next run would train on the replies it measured the last one on."""
    settings = load_settings_from_dict({})
    keys = [ConversationKey("telegram", str(n), None, "u") for n in range(40)]
    for key in keys:
        sqlite_store.add(key, Turn("user", f"hello from {key.chat}", user="u"), Turn("assistant", "hi", reply_to="u"))
    held_before = {d.source for d in split_held_out(from_memory(sqlite_store, settings), 0.25, seed=0)[1]}
    for key in keys:
        sqlite_store.add(key, Turn("user", "and again", user="u"), Turn("assistant", "hi again", reply_to="u"))
    held_after = {d.source for d in split_held_out(from_memory(sqlite_store, settings), 0.25, seed=0)[1]}
    assert len(held_before) == 10 and held_after == held_before


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
def test_two_dialogues_give_one_to_each_side(fraction):
    train, held = split_held_out(numbered(2), fraction, seed=3)
    assert len(train) == 1 and len(held) == 1


def test_too_few_dialogues_or_a_fraction_out_of_range_are_refused():
    with pytest.raises(DataError, match="at least two dialogues.*1 was given"):
        split_held_out(numbered(1), 0.1, seed=0)
    with pytest.raises(DataError, match="at least two dialogues.*none"):
        split_held_out([], 0.1, seed=0)
    for fraction in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(DataError, match="between 0 and 1"):
            split_held_out(numbered(5), fraction, seed=0)
