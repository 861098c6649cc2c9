"""The Telegram adapter end to end: `chatforge run` as a subprocess, against a fake Bot API on loopback.

The real python-telegram-bot client talks HTTP to tests/fake_telegram.py;
the tiny GPT-2 answers free text (garbage, so only the plumbing is checked)
and the built-in commands give text to check. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fake_telegram import BOT_USERNAME, FakeTelegram, reply_target
from processes import terminate

TOKEN = "123456789:AAF-fake-test-token-Zq8xW"
CHATFORGE = str(Path(sys.executable).parent / "chatforge")
STARTUP = 120  # seconds to import torch, load the tiny model and reach Telegram (a busy CI machine)
ANSWER = 60  # seconds for one answer

COMMANDS_PLUGIN = '''
import asyncio
from chatforge import hookimpl

def long_command(ctx):
    prose = "\\n\\n".join(f"Paragraph {i}: " + "words " * 60 for i in range(16))
    code = "```python\\n" + "\\n".join(f"print('line {i:02d}')  # " + "x" * 45 for i in range(80)) + "\\n```"
    text = prose + "\\n\\n" + code + "\\n\\nThe end."
    assert len(text) >= 10_000
    return text

async def slow_command(ctx):
    await asyncio.sleep(2)
    return "done slowly"

@hookimpl
def chatforge_register_commands(register):
    register("long", long_command, help="a very long answer")
    register("slow", slow_command, help="an answer that takes two seconds")
'''

# A model that writes slowly: the real generator's pieces, replayed 50 ms apart.
def slow_plugin(pause: float) -> str:
    """A plugin whose generator streams 40 words `pause` seconds apart, whatever a random model would write."""
    return f'''
import asyncio
from chatforge import hookimpl

@hookimpl
def chatforge_startup(bot):
    async def reply(history, text, on_text=None):
        words = [f"word{{index}} " for index in range(40)]
        for word in words:
            if on_text is not None:
                on_text(word)
            await asyncio.sleep({pause})
        return "".join(words).strip()

    bot.generator.reply = reply
'''


SLOW_PLUGIN = slow_plugin(0.05)


def write_config(folder: Path, tiny_gpt2: Path, model_cache: Path, base_url: str, telegram: str = "",
                 plugins: dict[str, str] | None = None, max_new_tokens: int = 12) -> Path:
    """A config serving only Telegram; `telegram` adds lines to its section, `plugins` files to load."""
    plugin_lines = ""
    for name, source in (plugins or {}).items():
        (folder / f"{name}.py").write_text(source)
        plugin_lines += f"  {name}:\n    module: ./{name}.py\n"
    section = textwrap.indent(textwrap.dedent(telegram).strip(), "    ")
    config = folder / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            generator:
              model: {tiny_gpt2}
              temperature: 0
              max_new_tokens: {max_new_tokens}
              cache_dir: {model_cache}
            memory:
              path: {folder / "memory.sqlite3"}
            limits:  # the tests talk faster than a person; rate limits have their own tests
              rate_per_minute: 100000
              rate_burst: 1000
            plugins:
              telegram:
                module: chatforge.adapters.telegram
            """)
        + plugin_lines
        + textwrap.dedent(f"""\
            adapters:
              console:
                enabled: false
              telegram:
                enabled: true
                token: ${{TEST_TG_TOKEN:-}}
                base_url: {base_url}
                poll_timeout: 5
            """)
        + (section + "\n" if section else "")
    )
    return config


class Bot:
    """`chatforge run` in the background; output goes to files so a full pipe never blocks it."""

    def __init__(self, config: Path, token: str | None = TOKEN, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        env.pop("TEST_TG_TOKEN", None)
        if token is not None:
            env["TEST_TG_TOKEN"] = token
        self.out_path, self.err_path = config.parent / "stdout.txt", config.parent / "stderr.txt"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen([CHATFORGE, "run", "--config", str(config)], stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, env=env, cwd=config.parent)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def terminate(self, grace: float = 15) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit status."""
        return terminate(self.process, grace)


def wait_until_polling(fake: FakeTelegram, bot: Bot) -> None:
    def ready() -> bool:
        if bot.process.poll() is not None:
            raise AssertionError(f"chatforge exited with {bot.process.returncode}:\n{bot.stderr}")
        return fake.count("setMyCommands") > 0 and fake.count("getUpdates") > 0
    fake.wait_for(ready, STARTUP, "the bot to start polling")


def texts(calls) -> list[str]:
    return [call.params.get("text", "") for call in calls]


# ---------------------------------------------------------------- one bot for most tests


@pytest.fixture(scope="module")
def fake():
    with FakeTelegram(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def bot(fake, tmp_path_factory, tiny_gpt2, model_cache):
    folder = tmp_path_factory.mktemp("telegram-bot")
    config = write_config(folder, tiny_gpt2, model_cache, fake.base_url, plugins={"commands": COMMANDS_PLUGIN})
    process = Bot(config)
    try:
        wait_until_polling(fake, process)
        yield process
    finally:
        process.terminate()


def test_a_private_message_gets_a_reply_to_it(fake, bot):
    message = fake.enqueue_message("hello there", chat_id=5001, user_id=5001)
    sent = fake.wait_for(lambda: fake.sent_messages(5001), ANSWER, "a reply in chat 5001")
    assert sent[0].params["text"].strip()
    assert sent[0].params["reply_parameters"]["message_id"] == message["message_id"]

    fake.enqueue_message("/sentiment I love it", chat_id=5001, user_id=5001)
    sent = fake.wait_for(lambda: fake.sent_messages(5001)[1:], ANSWER, "the /sentiment answer")
    assert sent[0].params["text"].startswith("positive")

    fake.enqueue_message("/start", chat_id=5001, user_id=5001)  # what Telegram sends when a user opens the bot
    sent = fake.wait_for(lambda: fake.sent_messages(5001)[2:], ANSWER, "the /start answer")
    assert sent[0].params["text"].startswith("Commands:\n")


def test_the_bot_says_at_the_default_log_level_that_it_is_connected(fake, bot):
    def connected() -> list[str]:
        return [line for line in bot.stderr.splitlines() if "connected as" in line]

    fake.wait_for(connected, 5, "the announcement")
    assert connected() == [f"chatforge: INFO: telegram: connected as @{BOT_USERNAME} (polling)"]


def test_typing_is_shown_while_answering(fake, bot):
    fake.enqueue_message("are you typing?", chat_id=5002, user_id=5002)
    fake.wait_for(lambda: fake.sent_messages(5002), ANSWER, "a reply in chat 5002")
    actions = fake.calls_to("sendChatAction", chat_id=5002)
    assert actions and all(call.params["action"] == "typing" for call in actions)
    assert actions[0].at <= fake.sent_messages(5002)[0].at


def test_the_command_menu_lists_the_commands(fake, bot):
    commands = fake.calls_to("setMyCommands")[-1].params["commands"]
    names = [command["command"] for command in commands]
    assert {"help", "history", "reset", "sentiment", "long", "slow"} <= set(names)
    assert all(command["description"] for command in commands)
    help_line = next(command for command in commands if command["command"] == "help")
    assert help_line["description"] == "list the commands"


def test_in_a_group_only_what_addresses_the_bot_is_answered(fake, bot):
    group = -1001000000001
    fake.enqueue_message("just chatting among ourselves", chat_id=group, user_id=601, group=True)
    fake.enqueue_message("/help@some_other_bot", chat_id=group, user_id=601, group=True)
    fake.enqueue_message(f"@{BOT_USERNAME} I am a bot too", chat_id=group, user_id=602, group=True, is_bot=True)
    fake.wait_polls(2, 15)
    time.sleep(0.5)
    assert fake.sent_messages(group) == [], "the bot answered group chatter"
    # Still nothing after the engine had time to work on them.
    fake.enqueue_message("/reset", chat_id=-1001000000999, user_id=601, group=True)
    fake.wait_for(lambda: fake.sent_messages(-1001000000999), ANSWER, "a sentinel reply")
    assert fake.sent_messages(group) == []

    mention = fake.enqueue_message(f"@{BOT_USERNAME} what is the weather like?", chat_id=group, user_id=601,
                                   group=True)
    sent = fake.wait_for(lambda: fake.sent_messages(group), ANSWER, "the answer to the mention")
    assert sent[0].params["reply_parameters"]["message_id"] == mention["message_id"]

    fake.enqueue_message(f"/help@{BOT_USERNAME}", chat_id=group, user_id=601, group=True)
    sent = fake.wait_for(lambda: fake.sent_messages(group)[1:], ANSWER, "the /help answer")
    assert sent[0].params["text"].startswith("Commands:\n") and "\n/help - list the commands" in sent[0].params["text"]

    earlier = reply_target(sent[0].result["message_id"], group)
    fake.enqueue_message("and why is that?", chat_id=group, user_id=601, group=True, reply_to=earlier)
    fake.wait_for(lambda: fake.sent_messages(group)[2:], ANSWER, "the answer to a reply to the bot")

    fake.enqueue_message("/history", chat_id=group, user_id=601, group=True)
    sent = fake.wait_for(lambda: fake.sent_messages(group)[3:], ANSWER, "the /history answer")
    history = sent[0].params["text"]
    assert "You: what is the weather like?\n" in history  # the @mention was taken out
    assert "You: and why is that?\n" in history
    assert "chatting among ourselves" not in history
    assert len(fake.sent_messages(group)) == 4


def test_a_long_reply_is_split_with_code_blocks_balanced(fake, bot):
    chat = 5003
    fake.enqueue_message("/long", chat_id=chat, user_id=chat)
    fake.wait_for(lambda: any("The end." in text for text in texts(fake.sent_messages(chat))), ANSWER,
                  "the last part of the long answer")
    parts = texts(fake.sent_messages(chat))
    assert len(parts) >= 3
    assert all(0 < len(part) <= 4096 for part in parts)
    assert all(part.count("```") % 2 == 0 for part in parts)
    joined = "\n".join(parts)
    assert all(f"print('line {i:02d}')" in joined for i in range(80))
    assert sum(len(part) for part in parts) >= 10_000
    replies_to = [call.params.get("reply_parameters") for call in fake.sent_messages(chat)]
    assert replies_to[0] is not None and all(reply is None for reply in replies_to[1:])


def test_two_users_in_a_group_have_separate_memories(fake, bot):
    group = -1001000000002
    fake.enqueue_message(f"@{BOT_USERNAME} my name is Alice", chat_id=group, user_id=701, group=True,
                         first_name="Alice")
    fake.enqueue_message(f"@{BOT_USERNAME} my name is Bob", chat_id=group, user_id=702, group=True,
                         first_name="Bob")
    fake.wait_for(lambda: len(fake.sent_messages(group)) >= 2, ANSWER, "both answers")
    fake.enqueue_message("/history", chat_id=group, user_id=701, group=True)
    fake.wait_for(lambda: len(fake.sent_messages(group)) >= 3, ANSWER, "Alice's /history")
    fake.enqueue_message("/history", chat_id=group, user_id=702, group=True)
    fake.wait_for(lambda: len(fake.sent_messages(group)) >= 4, ANSWER, "Bob's /history")
    alice, bob = texts(fake.sent_messages(group))[2:4]
    assert "You: my name is Alice" in alice and "Bob" not in alice
    assert "You: my name is Bob" in bob and "Alice" not in bob


def test_polling_resumes_after_the_bot_api_fails(fake, bot):
    def failures() -> int:
        return len([call for call in fake.calls_to("getUpdates") if call.status >= 500])

    before = failures()
    fake.fail_get_updates(2, status=502)
    fake.fail_get_updates(1, status=500)
    # PTB backs off 1, 1.5 and 2.25 s after each failure.
    fake.wait_for(lambda: failures() - before == 3, 30, "three failed getUpdates calls")
    fake.enqueue_message("are you still there?", chat_id=5004, user_id=5004)
    fake.wait_for(lambda: fake.sent_messages(5004), 30, "an answer after the outage")
    assert bot.process.poll() is None


def test_sigterm_while_idle_exits_zero_with_clean_logs(fake, bot):
    fake.wait_polls(1, 15)
    started = time.monotonic()
    bot.process.send_signal(signal.SIGTERM)
    status = bot.wait(15)
    assert status == 0, bot.stderr
    assert time.monotonic() - started < 5
    log = bot.stderr + bot.stdout
    assert TOKEN not in log and TOKEN.split(":")[1] not in log
    assert "Traceback" not in log
    assert "polling Telegram failed (NetworkError: Bad Gateway); retrying" in log


# ---------------------------------------------------------------- bots of their own


def test_streaming_sends_once_then_edits_at_the_interval(tmp_path, tiny_gpt2, model_cache):
    with FakeTelegram(TOKEN) as fake:
        # a 5 s stream: the edits it asserts still happen if the first send stalls 2 s on a loaded machine (seen in CI)
        config = write_config(tmp_path, tiny_gpt2, model_cache, fake.base_url, plugins={"slow": slow_plugin(0.12)},
                              telegram="stream: true\nstream_interval: 0.3", max_new_tokens=40)
        bot = Bot(config)
        try:
            wait_until_polling(fake, bot)
            fake.rate_limit_edits(1, retry_after=1)
            fake.enqueue_message("hello there, how are you today?", chat_id=6001, user_id=6001)
            fake.wait_for(lambda: fake.sent_messages(6001), ANSWER, "the first words")
            fake.enqueue_message("/history", chat_id=6001, user_id=6001)
            fake.wait_for(lambda: len(fake.sent_messages(6001)) >= 2, ANSWER, "the /history answer")
        finally:
            status = bot.terminate()
        assert status == 0, bot.stderr
        first, history = fake.sent_messages(6001)
        edits = fake.calls_to("editMessageText", chat_id=6001)
        limited = [edit for edit in edits if edit.status == 429]
        applied = [edit for edit in edits if edit.status == 200]
        assert len(limited) == 1 and len(applied) >= 2, [(e.status, e.params["text"]) for e in edits]
        assert all(edit.at < history.at for edit in edits)
        assert all(edit.params["message_id"] == first.result["message_id"] for edit in edits)
        times = [first.at] + [edit.at for edit in edits]
        assert all(later - earlier >= 0.28 for earlier, later in zip(times, times[1:]))
        after_limit = [edit.at for edit in applied if edit.at > limited[0].at]
        assert after_limit and after_limit[0] - limited[0].at >= 0.95
        final = applied[-1].params["text"]
        assert len(final) >= len(first.params["text"])
        assert f"You: hello there, how are you today?\nchatforge: {final.strip()}" in history.params["text"]
        assert TOKEN not in bot.stderr and "Traceback" not in bot.stderr


def test_webhook_mode_and_a_reply_in_flight_at_sigterm(tmp_path, tiny_gpt2, model_cache):
    port = free_port()
    hook = f"http://127.0.0.1:{port}/telegram-hook"
    with FakeTelegram(TOKEN) as fake:
        config = write_config(tmp_path, tiny_gpt2, model_cache, fake.base_url, plugins={"commands": COMMANDS_PLUGIN},
                              telegram=f"""
            mode: webhook
            port: {port}
            url: http://127.0.0.1:{port}/telegram-hook
            secret_token: hook-secret_42
        """)
        bot = Bot(config)
        try:
            fake.wait_for(lambda: fake.calls_to("setWebhook") or bot.process.poll() is not None, STARTUP,
                          "setWebhook")
            assert bot.process.poll() is None, bot.stderr
            registered = fake.calls_to("setWebhook")[0].params
            assert registered["url"] == hook and registered["secret_token"] == "hook-secret_42"
            assert post_json(hook, update(1, "/reset"), "wrong-secret") == 403
            assert post_json(hook, update(1, "/reset"), "hook-secret_42") == 200
            sent = fake.wait_for(lambda: fake.sent_messages(6101), ANSWER, "the /reset answer")
            assert "nothing to forget" in sent[0].params["text"]
            assert len(fake.sent_messages(6101)) == 1
            assert fake.count("getUpdates") == 0

            # SIGTERM while a reply is being worked on: it is still sent, then the bot exits 0.
            typing_before = len(fake.calls_to("sendChatAction", chat_id=6101))
            assert post_json(hook, update(2, "/slow"), "hook-secret_42") == 200
            fake.wait_for(lambda: len(fake.calls_to("sendChatAction", chat_id=6101)) > typing_before, 10,
                          "typing for /slow")
            bot.process.send_signal(signal.SIGTERM)
            status = bot.wait(15)
        finally:
            bot.terminate()
        assert status == 0, bot.stderr
        assert texts(fake.sent_messages(6101)) == ["There was nothing to forget: this conversation is already empty.",
                                                   "done slowly"]
        assert "Traceback" not in bot.stderr


WORKER_SECRET = "shared-Worker_secret-9fK2"


def test_two_webhook_workers_share_a_secret_one_registers_and_a_redelivery_is_answered_once(
        tmp_path, tiny_gpt2, model_cache):
    """Two `chatforge run` workers behind one public URL, sharing one SQLite memory file and a secret from
    the environment: only the one with set_webhook true calls setWebhook (neither deletes it at exit), an
    update POSTed to both (Telegram's redelivery, given to the other worker) is answered once, and a wrong
    secret is refused by both."""
    public = "https://bot.example.com/telegram-hook"
    ports = [free_port(), free_port()]
    hooks = [f"http://127.0.0.1:{port}/telegram-hook" for port in ports]
    memory = tmp_path / "shared.sqlite3"
    with FakeTelegram(TOKEN) as fake:
        bots = []
        try:
            for index, (port, registers) in enumerate(zip(ports, ["true", "false"])):
                folder = tmp_path / f"worker{index}"
                folder.mkdir()
                config = write_config(folder, tiny_gpt2, model_cache, fake.base_url,
                                      plugins={"commands": COMMANDS_PLUGIN}, telegram=f"""
                    mode: webhook
                    port: {port}
                    url: {public}
                    secret_token: ${{TEST_TG_WEBHOOK_SECRET}}
                    set_webhook: {registers}
                """)
                config.write_text(config.read_text().replace(str(folder / "memory.sqlite3"), str(memory)))
                bots.append(Bot(config, env={"TEST_TG_WEBHOOK_SECRET": WORKER_SECRET}))
            for bot in bots:
                def connected(bot=bot) -> bool:
                    if bot.process.poll() is not None:
                        raise AssertionError(f"chatforge exited with {bot.process.returncode}:\n{bot.stderr}")
                    return "connected as" in bot.stderr
                fake.wait_for(connected, STARTUP, "both workers to start")
            assert [call.params for call in fake.calls_to("setWebhook")] == [
                {"url": public, "secret_token": WORKER_SECRET, "allowed_updates": ["message"]}]
            assert (f"telegram: connected as @{BOT_USERNAME} (webhook, registered by another worker: "
                    "set_webhook is false)") in bots[1].stderr

            for hook in hooks:  # a wrong or missing secret: refused by both
                assert post_json(hook, update(1, "/help", chat_id=6201), "wrong-secret") == 403
                assert post_json(hook, update(1, "/help", chat_id=6201), "") == 403

            # Worker 0 answers; the same update then reaches worker 1 (Telegram saw no answer in time).
            assert post_json(hooks[0], update(2, "/reset", chat_id=6201), WORKER_SECRET) == 200
            fake.wait_for(lambda: fake.sent_messages(6201), ANSWER, "the /reset answer")
            assert post_json(hooks[1], update(2, "/reset", chat_id=6201), WORKER_SECRET) == 200
            # Both at once, the other way round, and free text (its turn is stored once).
            same = update(3, "hello from both sides", chat_id=6201)
            with ThreadPoolExecutor(2) as pool:
                statuses = list(pool.map(lambda hook: post_json(hook, same, WORKER_SECRET), hooks[::-1]))
            assert statuses == [200, 200]
            fake.wait_for(lambda: fake.sent_messages(6201)[1:], ANSWER, "the answer to the free text")
            # A new update after them is answered: so the worker that dropped a copy had taken it by now.
            for hook in hooks:
                assert post_json(hook, update(4 + hooks.index(hook), "/help", chat_id=6201), WORKER_SECRET) == 200
            fake.wait_for(lambda: fake.sent_messages(6201)[3:], ANSWER, "two /help answers")
            time.sleep(1)  # a second answer to a copy would have come by now
            answered_to = [call.params["reply_parameters"]["message_id"] for call in fake.sent_messages(6201)]
            statuses = [bot.terminate() for bot in bots]
        finally:
            for bot in bots:
                bot.terminate()
        assert statuses == [0, 0], [bot.stderr for bot in bots]
        assert answered_to == [12, 13, 14, 15] or answered_to == [12, 13, 15, 14], answered_to
        assert fake.count("setWebhook") == 1 and fake.count("deleteWebhook") == 0
        with sqlite3.connect(memory) as db:
            stored = db.execute("SELECT role, text FROM turns ORDER BY id").fetchall()
        assert [text for role, text in stored if role == "user"] == ["hello from both sides"]
        for bot in bots:
            output = bot.stderr + bot.stdout
            assert WORKER_SECRET not in output and TOKEN not in output
            assert "Traceback" not in output


def update(update_id: int, text: str, chat_id: int = 6101) -> dict:
    return {"update_id": update_id, "message": {
        "message_id": 10 + update_id, "date": int(time.time()), "text": text,
        "chat": {"id": chat_id, "type": "private", "first_name": "Ann"},
        "from": {"id": chat_id, "is_bot": False, "first_name": "Ann"}}}


@pytest.mark.parametrize("token", [None, "987654321:AAH-wrong-token-Kp3vN"], ids=["missing", "rejected"])
def test_a_missing_or_rejected_token_exits_2_naming_the_key(tmp_path, tiny_gpt2, model_cache, token):
    with FakeTelegram(TOKEN) as fake:
        config = write_config(tmp_path, tiny_gpt2, model_cache, fake.base_url)
        bot = Bot(config, token=token)
        try:
            status = bot.wait(STARTUP)
        finally:
            bot.terminate()
        output = bot.stdout + bot.stderr
        assert status == 2, output
        assert "adapters.telegram.token" in bot.stderr
        assert "Traceback" not in output
        if token is not None:
            assert "Telegram rejected the token" in bot.stderr
            assert token not in output and token.split(":")[1] not in output
            assert fake.calls_to("getMe")[0].status == 401
        else:
            assert "no token is set" in bot.stderr
            assert fake.calls == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_json(url: str, body: dict, secret: str) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": secret})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("line, expected", [
    ("mode: push", "adapters.telegram.mode"),
    ("secret_token: has spaces!", "adapters.telegram.secret_token"),
    ("poll_timeout: 3600", "adapters.telegram.poll_timeout"),
    ("tokn: abc", "adapters.telegram.tokn"),
    ("set_webhook: sometimes", "adapters.telegram.set_webhook"),
    # A worker that does not register the webhook must be given the secret the registering one uses.
    ("mode: webhook\n    url: https://bot.example.com/hook\n    set_webhook: false", "adapters.telegram.set_webhook"),
    ("secret_token: ${TEST_TG_BAD_SECRET}", "adapters.telegram.secret_token"),
])
def test_config_check_names_a_bad_telegram_key(cli, tmp_path, line, expected):
    (tmp_path / "config.yaml").write_text(
        f"plugins:\n  telegram:\n    module: chatforge.adapters.telegram\n"
        f"adapters:\n  telegram:\n    enabled: true\n    {line}\n")
    result = cli("config", "check", cwd=tmp_path, env={"TEST_TG_BAD_SECRET": "not/a valid+secret"})
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert "not/a valid+secret" not in result.stderr + result.stdout  # a secret is never shown


@pytest.mark.parametrize("lines", [
    "mode: webhook\n    url: https://bot.example.com/hook\n    secret_token: ${TEST_TG_SECRET}\n    set_webhook: false",
    "mode: webhook\n    url: https://bot.example.com/hook",  # one process: a random secret, as before
    "set_webhook: false",  # polling: the webhook keys are not used
])
def test_config_check_accepts_the_webhook_worker_settings(cli, tmp_path, lines):
    (tmp_path / "config.yaml").write_text(
        f"plugins:\n  telegram:\n    module: chatforge.adapters.telegram\n"
        f"adapters:\n  telegram:\n    enabled: true\n    token: x\n    {lines}\n")
    result = cli("config", "check", cwd=tmp_path, env={"TEST_TG_SECRET": "A-good_secret-42"})
    assert result.returncode == 0, result.stderr
    assert "A-good_secret-42" not in result.stderr + result.stdout


def test_a_flood_in_one_chat_is_answered_busy_beyond_max_pending(tmp_path, tiny_gpt2, model_cache):
    """Messages waiting for their chat's turn in the adapter count toward limits.max_pending."""
    with FakeTelegram(TOKEN) as fake:
        config = write_config(tmp_path, tiny_gpt2, model_cache, fake.base_url, plugins={"slow": SLOW_PLUGIN})
        config.write_text(config.read_text().replace("limits:", "limits:\n  max_pending: 4", 1))
        bot = Bot(config)
        try:
            wait_until_polling(fake, bot)
            for n in range(200):  # one chat, one user, far more than the bound
                fake.enqueue_message(f"flood {n}", chat_id=7001, user_id=7001)
            busy = fake.wait_for(lambda: [text for text in texts(fake.sent_messages(7001)) if "busy" in text],
                                 ANSWER, "a busy answer")
            answered = fake.wait_for(
                lambda: [text for text in texts(fake.sent_messages(7001)) if text.startswith("word0")][3:],
                ANSWER, "the admitted messages' answers")
            time.sleep(3)  # a reply that was not admitted would have come by now (2 s each)
            sent = texts(fake.sent_messages(7001))
            fake.enqueue_message("/help", chat_id=7002, user_id=7002)  # places are given back
            fake.wait_for(lambda: fake.sent_messages(7002), ANSWER, "an answer after the flood")
        finally:
            status = bot.terminate()
        assert status == 0, bot.stderr
        assert len([text for text in sent if text.startswith("word0")]) == 4, sent
        assert busy == ["I'm busy answering a lot of messages right now; please try again in a minute."]
        assert len(sent) == 5, sent  # busy is said once per flood, not 196 times
        assert "Traceback" not in bot.stderr
