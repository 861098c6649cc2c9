"""Memory backends are plugins: chosen by `memory.backend`, each validating its own keys, called off the loop.

A third-party store here is a plugin file loaded from the config, like any
plugin; the built-in sqlite and memory stores register through the same hook.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time
from pathlib import Path

from chatforge.conversation import ConversationKey
from chatforge.config import load_settings_from_dict
from chatforge.memory import InMemoryMemory
from chatforge.plugin_manager import PluginHost
from chatforge.sqlite_memory import SQLiteBackend, SQLiteMemory
from chatforge.testing import FakeGenerator, make_bot

GENERATOR = "generator:\n  backend: echo\n"

# A store that keeps turns in a JSON-lines file and a plain echo generator: no torch, no model.
JOURNAL_PLUGIN = '''
import json
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from chatforge import hookimpl
from chatforge.generation import GeneratorBackend
from chatforge.memory import InMemoryMemory, MemoryBackend


class JournalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    keep: int = Field(100, ge=1)


class JournalMemory(InMemoryMemory):
    """In memory, and every add() also appended to a file: enough to see that the plugin's store is used."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    def add(self, key, *turns):
        super().add(key, *turns)
        with self.path.open("a") as file:
            for turn in turns:
                file.write(json.dumps([key.encode(), turn.role, turn.text]) + "\\n")

    def close(self):
        print("journal closed", file=sys.stderr)


class JournalBackend(MemoryBackend):
    name = "journal"
    Config = JournalConfig

    @classmethod
    def create(cls, config, settings):
        return JournalMemory(settings.resolve_path(config.file))


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: str


class Echo:
    name = "echo"

    async def reply(self, history, text, on_text=None):
        return f"echo: {text} (history {len(history)})"

    async def complete(self, instruction, max_new_tokens=None):
        return instruction

    def close(self):
        pass


class EchoBackend(GeneratorBackend):
    name = "echo"
    Config = EchoConfig

    @classmethod
    def create(cls, config, settings):
        return Echo()


@hookimpl
def chatforge_register_memory_backends(register):
    register(JournalBackend)


@hookimpl
def chatforge_register_generators(register):
    register(EchoBackend)
'''


def journal_config(folder: Path, memory: str) -> Path:
    (folder / "journal.py").write_text(JOURNAL_PLUGIN)
    config = folder / "config.yaml"
    config.write_text(GENERATOR + "memory:\n" + textwrap.indent(textwrap.dedent(memory).strip(), "  ") + "\n"
                      + "plugins:\n  journal:\n    module: ./journal.py\n")
    return config


def test_a_third_party_store_is_chosen_by_name_and_gets_its_own_keys(cli, tmp_path):
    config = journal_config(tmp_path, "backend: journal\nfile: turns.jsonl\nmax_turns: 6")
    result = cli("chat", "-c", str(config), stdin="hi\nagain\n/history\n")
    assert result.returncode == 0, result.stderr
    assert "echo: hi (history 0)" in result.stdout and "echo: again (history 2)" in result.stdout
    assert "You: again" in result.stdout  # /history reads the plugin's store
    journal = (tmp_path / "turns.jsonl").read_text().splitlines()
    assert len(journal) == 4 and '"user", "hi"' in journal[0]
    assert "journal closed" in result.stderr
    assert not (tmp_path / "memory.sqlite3").exists()


def test_a_stores_keys_are_validated_by_its_own_model_with_yaml_lines(cli, tmp_path):
    config = journal_config(tmp_path, "backend: journal\nkeep: 0\nfiel: x\nscope: chat")
    result = cli("config", "check", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{config}:3: memory.file: is required" in result.stderr, result.stderr
    assert f"{config}:5: memory.keep: must be greater than or equal to 1, got 0" in result.stderr
    assert f'{config}:6: memory.fiel: unknown key (did you mean "file"?)' in result.stderr
    assert "memory.scope" not in result.stderr  # the engine's keys stay the engine's, whichever store


def test_an_unknown_store_is_one_line_naming_the_available_ones(cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("memory:\n  backend: sqlit\n  path: x.sqlite3\n")
    result = cli("config", "check", "-c", str(config))
    assert result.returncode == 2
    assert f'{config}:2: memory.backend: no memory backend named "sqlit" (available: ' in result.stderr, result.stderr
    assert 'did you mean "sqlite"?' in result.stderr and "Traceback" not in result.stderr


def test_chatforge_plugins_lists_the_stores_and_the_chosen_one(cli, tmp_path):
    config = journal_config(tmp_path, "backend: journal\nfile: turns.jsonl")
    result = cli("plugins", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "  memory backends: journal (chosen)" in result.stdout
    assert "  memory backends: sqlite\n" in result.stdout


def test_todays_memory_keys_still_belong_to_the_default_store():
    settings = load_settings_from_dict({"memory": {"path": "m.sqlite3", "scope": "chat", "max_turns": 4}})
    host = PluginHost(settings)
    assert host.load() == []
    assert host.memory_backend is SQLiteBackend and host.memory_config.path == "m.sqlite3"
    assert host.infos["sqlite"].memory_backends == ["sqlite"] and host.infos["sqlite"].source == "builtin"
    assert settings.memory.scope == "chat" and settings.memory.max_turns == 4


def test_a_typo_in_the_default_stores_section_is_caught_with_the_rest_of_the_file():
    from chatforge.config import ConfigError
    try:
        load_settings_from_dict({"memory": {"pth": "m.sqlite3"}})
    except ConfigError as error:
        assert [issue.path for issue in error.issues] == ["memory.pth"]
        assert 'did you mean "path"' in error.issues[0].message
    else:
        raise AssertionError("a typo was accepted")


# ---------------------------------------------------------------- the event loop never waits for a store

class SlowStore(InMemoryMemory):
    """Reading one chat's history takes `delay` seconds, as a database on a bad network would."""

    def __init__(self, slow_chat: str, delay: float) -> None:
        super().__init__()
        self.slow_chat, self.delay = slow_chat, delay
        self.threads: set[str] = set()

    def recent(self, key, limit):
        self.threads.add(threading.current_thread().name)
        if key.chat == self.slow_chat:
            time.sleep(self.delay)
        return super().recent(key, limit)


def test_a_slow_store_delays_neither_another_conversation_nor_the_event_loop():
    store = SlowStore("slow-chat", delay=1.5)
    bot = make_bot(memory=store)

    async def scenario():
        lags: list[float] = []

        async def heartbeat():  # what an adapter's gateway heartbeat needs: the loop turning
            while True:
                started = time.monotonic()
                await asyncio.sleep(0.05)
                lags.append(time.monotonic() - started - 0.05)

        beating = asyncio.create_task(heartbeat())
        finished: dict[str, float] = {}
        started = time.monotonic()

        async def ask(chat):
            await bot.ask_async("hello", chat=chat)
            finished[chat] = time.monotonic() - started

        await asyncio.wait_for(asyncio.gather(ask("slow-chat"), ask("fast-chat")), 20)
        beating.cancel()
        return finished, lags

    finished, lags = bot._run(scenario())
    bot.close()
    assert finished["fast-chat"] < 0.75 < 1.5 <= finished["slow-chat"], finished
    assert max(lags) < 0.5, f"the event loop stalled for {max(lags):.2f} s"
    assert store.threads and all(name.startswith("chatforge-memory") for name in store.threads), store.threads


def test_a_lost_turn_is_one_line_naming_the_conversation_and_the_reply_is_sent(caplog):
    class FullStore(InMemoryMemory):
        def add(self, key, *turns):
            raise OSError(28, "No space left on device")

    bot = make_bot(memory=FullStore())
    with caplog.at_level(logging.ERROR):
        assert bot.ask("keep this", chat="c-1", user="ann") == "echo: keep this"
    lines = [record.getMessage() for record in caplog.records if "could not save" in record.getMessage()]
    assert lines == ["memory: could not save a turn of test/c-1 (ann) (OSError: [Errno 28] No space left on "
                     "device); the turn is lost, the reply is still sent"]
    bot.close()


def test_an_update_delivered_twice_is_first_delivered_once(tmp_path):
    path = tmp_path / "memory.sqlite3"
    first, second = SQLiteMemory(path), SQLiteMemory(path)  # two processes' handles on one file
    bots = [make_bot(memory=first), make_bot(memory=second)]
    try:
        answers = [bots[0]._run(bots[0].engine.first_delivery("telegram:77")),
                   bots[1]._run(bots[1].engine.first_delivery("telegram:77")),
                   bots[1]._run(bots[1].engine.first_delivery("telegram:78"))]
        assert answers == [True, False, True]
    finally:
        for bot in bots:
            bot.close()


def test_a_store_that_cannot_say_lets_the_update_through(caplog):
    class Down(InMemoryMemory):
        def claim(self, event):
            raise ConnectionError("the database is down")

    bot = make_bot(memory=Down())
    with caplog.at_level(logging.WARNING):
        assert bot._run(bot.engine.first_delivery("telegram:1")) is True
    assert any("could not check whether telegram:1 was already answered" in r.getMessage() for r in caplog.records)
    bot.close()


def test_the_store_lock_is_held_while_a_message_is_answered():
    events: list[str] = []

    class Recording(InMemoryMemory):
        def lock(self, key):
            assert isinstance(key, ConversationKey)

            class Held:
                def __enter__(self):
                    events.append(f"lock {key.chat}")

                def __exit__(self, *exc):
                    events.append(f"unlock {key.chat}")
            return Held()

    def respond(history, text):
        events.append(f"generate {text}")
        return "ok"

    bot = make_bot(memory=Recording(), generator=FakeGenerator(respond))
    bot.ask("one", chat="a")
    bot.close()
    assert events == ["lock a", "generate one", "unlock a"]


def test_a_misspelt_engine_key_beside_another_store_is_named_with_its_right_spelling(cli, tmp_path):
    config = journal_config(tmp_path, "backend: journal\nfile: turns.jsonl\nscpoe: chat")
    result = cli("config", "check", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert f'{config}:6: memory.scpoe: unknown key (did you mean "scope"?)' in result.stderr, result.stderr
    assert result.stderr.count("memory.scpoe") == 1


def test_an_error_inside_the_conversation_lock_reaches_the_caller_unchanged():
    """Strict mode stops the bot with the plugin's error raised through the lock; it must come out as it went in."""
    from chatforge import hookimpl
    from chatforge.plugin_manager import PluginError

    class Broken:
        @hookimpl
        def chatforge_handle_text(self, message):
            raise ValueError("broken on purpose")

    class Locking(InMemoryMemory):
        def lock(self, key):
            return threading.Lock()  # a real lock, taken and released off the loop

    for store in (InMemoryMemory(), Locking()):  # a no-op lock, and one the store gives
        bot = make_bot(memory=store, plugins={"broken": Broken()}, strict=True)
        try:
            bot.ask("hello")
        except PluginError as error:
            assert "broken on purpose" in str(error)
        else:
            raise AssertionError("strict mode did not raise")
        finally:
            bot.close()


def test_a_lock_still_being_taken_when_its_message_is_cancelled_is_released_once_taken():
    taken, released = threading.Event(), threading.Event()

    class SlowLock(InMemoryMemory):
        def lock(self, key):
            class Held:
                def __enter__(self):
                    time.sleep(0.5)  # another process holds it for a while
                    taken.set()

                def __exit__(self, *exc):
                    released.set()
            return Held()

    bot = make_bot(memory=SlowLock())

    async def scenario():
        task = asyncio.create_task(bot.ask_async("hello"))
        await asyncio.sleep(0.1)
        task.cancel()  # shutdown, or a platform that gave up on the update
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(50):  # bounded: 5 s
            if released.is_set():
                break
            await asyncio.sleep(0.1)

    bot._run(scenario())
    bot.close()
    assert taken.is_set() and released.is_set(), "a lock taken after its message was cancelled was never released"


def test_memory_commands_say_the_memory_is_unreachable_rather_than_that_a_plugin_failed(caplog):
    class Down(InMemoryMemory):
        def _down(self, *args, **kwargs):
            raise ConnectionError("connection refused")

        recent = count = forget = about_user = forget_user = _down

    bot = make_bot(memory=Down(), strict=False)
    with caplog.at_level(logging.WARNING):
        answers = {command: bot.ask(command) for command in ("/history", "/history all", "/reset", "/forget")}
    bot.close()
    for command, answer in answers.items():
        assert answer == "I can't reach my memory right now, so I can't do that; please try again in a minute.", \
            (command, answer)
    assert any("ConnectionError: connection refused" in r.getMessage() for r in caplog.records)
    assert not any("failed" in answer for answer in answers.values())


def test_a_sqlite_path_left_beside_another_store_is_ignored_not_refused(cli, tmp_path):
    """Switching the shipped config to `backend: memory` leaves its `path:` line: that must keep working."""
    config = tmp_path / "config.yaml"
    config.write_text(GENERATOR.replace("echo", "transformers") + "memory:\n  backend: memory\n  path: data/m.sqlite3\n")
    settings = load_settings_from_dict({"memory": {"backend": "memory", "path": "data/m.sqlite3"}})
    host = PluginHost(settings)
    assert host.load() == []
    result = cli("config", "check", "-c", str(config))
    assert result.returncode == 0, result.stderr


def test_create_memory_without_a_host_uses_the_configured_path(tmp_path):
    from chatforge.app import create_memory
    settings = load_settings_from_dict({"memory": {"path": str(tmp_path / "given.sqlite3")}})
    store = create_memory(settings)
    store.close()
    assert (tmp_path / "given.sqlite3").exists()
