"""The Discord adapter end to end: `chatforge run` (discord.py inside) against a fake Discord on loopback.

The fake (tests/fake_discord.py) speaks Discord's REST API and gateway on
127.0.0.1; the bot runs as a subprocess on the tiny GPT-2, so replies from the
model are garbage: tests check the plumbing, and use commands (/help,
/history, /sentiment, and /long from a plugin file) where text matters.
Every wait is bounded; every bot process is stopped (SIGTERM, then kill).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from processes import terminate
from fake_discord import (APP_ID, BOT_USER, CHANNEL_ID, DM_CHANNEL_ID, OTHER_CHANNEL_ID, THREAD_ID, FakeDiscord,
                          Request, user)

CHATFORGE = str(Path(sys.executable).parent / "chatforge")
TOKEN = "test-token-Zq8xWv3Kp"
READY_WITHIN = 120  # model loading in a cold subprocess on a busy machine
REPLY_WITHIN = 30
QUIET_FOR = 1.5  # how long "no reply" is waited for

ALICE = user("100000000000000001", "alice")
BOB = user("100000000000000002", "bob")
OTHER_BOT = user("100000000000000003", "otherbot", bot=True)

LONG_PLUGIN = '''
import asyncio

from chatforge import hookimpl


def long_command(ctx):
    prose = "\\n\\n".join(f"Paragraph {i}: " + "lorem ipsum dolor sit amet " * 12 for i in range(6))
    code = "\\n".join(f"line_{i} = {i} * 2  # a line of code in a long listing" for i in range(70))
    return f"{prose}\\n\\n```python\\n{code}\\n```\\n\\nThe end."


async def slow_command(ctx):
    await asyncio.sleep(2.5)  # longer than an interaction may wait for its answer
    return f"slow answer to {ctx.args}"


@hookimpl
def chatforge_register_commands(register):
    register("long", long_command, help="a long answer with a code block")
    register("slow", slow_command, help="answers after 2.5 s", usage="TEXT")
'''

PACED_PLUGIN = '''
import asyncio

from chatforge import hookimpl

WORDS = [f"word{i} " for i in range(24)]


class PacedGenerator:
    """Streams a known text at a known pace, so that edits can be counted."""

    def __init__(self, inner):
        self.inner = inner

    async def reply(self, history, text, on_text=None):
        for word in WORDS:
            await asyncio.sleep(0.12)  # a 3 s stream: its edits survive a stalled first send on a loaded machine
            if on_text is not None:
                on_text(word)
        return "".join(WORDS).strip()

    def __getattr__(self, name):
        return getattr(self.inner, name)


@hookimpl
def chatforge_startup(bot):
    bot.generator = PacedGenerator(bot.generator)
'''
PACED_TEXT = " ".join(f"word{i}" for i in range(24))


# ---------------------------------------------------------------- running the bot


class Bot:
    """A `chatforge run` subprocess serving on the fake Discord."""

    def __init__(self, folder: Path, fake: FakeDiscord, adapter_yaml: str, plugins_yaml: str = "",
                 token: str | None = TOKEN, model: Path | None = None, cache: Path | None = None,
                 limits_yaml: str = "", via: str | None = None, env: dict[str, str] | None = None) -> None:
        """`via`: reach the fake under this prefix, so that its requests and connections say it was this bot."""
        self.folder, self.fake, self.via = folder, fake, via
        api_base = fake.api_base_for(via) if via else fake.api_base
        gateway_url = fake.gateway_url_for(via) if via else fake.gateway_url
        self.config = folder / "config.yaml"
        self.config.write_text(textwrap.dedent(f"""
            generator:
              model: {model}
              temperature: 0
              max_new_tokens: 8
              cache_dir: {cache}
            memory:
              path: {folder / "memory.sqlite3"}
            limits:  # the tests talk faster than a person; rate limits have their own tests
              rate_per_minute: 100000
              rate_burst: 1000
            """) + textwrap.indent(textwrap.dedent(limits_yaml), "  ") + textwrap.dedent("""\
            plugins:
              discord:
                module: chatforge.adapters.discord
            """) + textwrap.indent(textwrap.dedent(plugins_yaml), "  ") + textwrap.dedent(f"""
            adapters:
              discord:
                enabled: true
                token: ${{TEST_DISCORD_TOKEN}}
                api_base: {api_base}
                gateway_url: {gateway_url}
            """) + textwrap.indent(textwrap.dedent(adapter_yaml), "    "))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        env.pop("TEST_DISCORD_TOKEN", None)
        if token is not None:
            env["TEST_DISCORD_TOKEN"] = token
        self.stdout_path, self.stderr_path = folder / "stdout.txt", folder / "stderr.txt"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen([CHATFORGE, "run", "--config", str(self.config)], cwd=folder,
                                            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, shards: set[int] | None = None) -> None:
        """Until this bot (its `via`, if it has one) was sent READY: on each of `shards`, if given."""
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"chatforge run exited with {self.process.returncode}:\n{self.stderr}")
            if shards is not None:
                return shards <= self.fake.ready_shards(self.via)
            return any(kind == "ready-sent" and (self.via is None or payload["via"] == self.via)
                       for kind, payload in self.fake.gateway_log)

        self.fake.wait_until(ready, READY_WITHIN, f"the bot to connect to the gateway (shards {shards})")

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15) -> int:
        return terminate(self.process, timeout)


def replies_to(fake: FakeDiscord, message_id: str, since: int = 0) -> list[Request]:
    """The bot's messages sent as a reply to `message_id`."""
    return [r for r in fake.find("POST", r"/channels/\d+/messages", since)
            if str(((r.body or {}).get("message_reference") or {}).get("message_id")) == message_id]


def wait_reply(fake: FakeDiscord, message_id: str, since: int = 0, timeout: float = REPLY_WITHIN) -> Request:
    return fake.wait_until(lambda: replies_to(fake, message_id, since), timeout, f"a reply to {message_id}")[0]


def content(request: Request) -> str:
    return (request.body or {}).get("content") or ""


# ---------------------------------------------------------------- the shared bot


@pytest.fixture(scope="module")
def fake():
    with FakeDiscord(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def bot(fake, tmp_path_factory, tiny_gpt2, model_cache):
    folder = tmp_path_factory.mktemp("discord-bot")
    (folder / "long.py").write_text(LONG_PLUGIN)
    running = Bot(folder, fake, f"respond_to: [dm, mention, '{OTHER_CHANNEL_ID}']\n",
                  "long:\n  module: ./long.py\n", model=tiny_gpt2, cache=model_cache)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_a_dm_and_a_mention_each_get_a_reply_to_the_message(bot, fake):
    since = fake.mark()
    dm = fake.dispatch_dm("hello there", ALICE)
    mention = fake.dispatch_message("how are you today?", ALICE, mention=True)
    in_dm = wait_reply(fake, dm, since)
    in_channel = wait_reply(fake, mention, since)
    assert in_dm.path == f"/channels/{DM_CHANNEL_ID}/messages" and content(in_dm).strip()
    assert in_channel.path == f"/channels/{CHANNEL_ID}/messages" and content(in_channel).strip()
    for reply in (in_dm, in_channel):
        assert reply.body["allowed_mentions"]["parse"] == [] and reply.body["allowed_mentions"]["replied_user"] is False
        assert len(content(reply)) <= 2000


def test_typing_is_shown_while_the_model_works(bot, fake):
    since = fake.mark()
    mention = fake.dispatch_message("tell me something", BOB, mention=True)
    wait_reply(fake, mention, since)
    typing = fake.find("POST", rf"/channels/{CHANNEL_ID}/typing", since)
    assert typing and typing[0].at <= replies_to(fake, mention, since)[0].at


def test_a_channel_listed_in_respond_to_gets_answers_without_a_mention(bot, fake):
    since = fake.mark()
    message = fake.dispatch_message("anyone here?", ALICE, channel_id=OTHER_CHANNEL_ID)
    assert wait_reply(fake, message, since).path == f"/channels/{OTHER_CHANNEL_ID}/messages"


def test_sentiment_typed_as_a_message_is_a_command(bot, fake):
    since = fake.mark()
    message = fake.dispatch_message("/sentiment I love it", ALICE)  # a command needs no mention
    assert content(wait_reply(fake, message, since)).startswith("positive (+")


def test_slash_commands_are_synced_and_answered(bot, fake):
    synced = fake.find("PUT", r"/applications/\d+/commands")
    assert synced, "the slash commands were not synced"
    commands = {command["name"]: command for command in synced[-1].body}
    assert {"help", "history", "reset", "sentiment", "long"} <= set(commands)
    assert commands["help"]["description"] == "list the commands" and commands["help"]["options"] == []
    assert [option["name"] for option in commands["sentiment"]["options"]] == ["args"]
    assert commands["sentiment"]["options"][0]["type"] == 3 and not commands["sentiment"]["options"][0]["required"]

    since = fake.mark()
    interaction, token = fake.dispatch_slash("sentiment", BOB, "I love it")
    answer = fake.wait_for("POST", rf"/interactions/{interaction}/{re.escape(token)}/callback", since,
                           timeout=REPLY_WITHIN)[0]
    assert answer.body["type"] == 4 and answer.body["data"]["content"].startswith("positive (+")

    interaction, token = fake.dispatch_slash("help", BOB)
    answer = fake.wait_for("POST", rf"/interactions/{interaction}/{re.escape(token)}/callback", since,
                           timeout=REPLY_WITHIN)[0]
    assert answer.body["data"]["content"].startswith("Commands:\n") and "\n/help - list the commands" in answer.body["data"]["content"]


def test_a_slow_slash_command_is_deferred_then_followed_up(bot, fake):
    since = fake.mark()
    interaction, token = fake.dispatch_slash("slow", ALICE, "please")
    callback = fake.wait_for("POST", rf"/interactions/{interaction}/{re.escape(token)}/callback", since,
                             timeout=REPLY_WITHIN)[0]
    assert callback.body["type"] == 5  # "thinking..."
    follow_up = fake.wait_for("POST", rf"/webhooks/{APP_ID}/{re.escape(token)}", since, timeout=REPLY_WITHIN)[0]
    assert follow_up.body["content"] == "slow answer to please"
    assert follow_up.at - callback.at >= 0.3

    since = fake.mark()
    interaction, token = fake.dispatch_slash("long", ALICE)
    first = fake.wait_for("POST", rf"/interactions/{interaction}/{re.escape(token)}/callback", since,
                          timeout=REPLY_WITHIN)[0]
    rest = fake.wait_until(lambda: (found := fake.find("POST", rf"/webhooks/{APP_ID}/{re.escape(token)}", since))
                           and "The end." in found[-1].body["content"] and found, REPLY_WITHIN, "the last part")
    texts = [first.body["data"]["content"]] + [part.body["content"] for part in rest]
    assert len(texts) >= 3 and all(len(text) <= 2000 for text in texts)


def test_config_check_names_a_bad_respond_to(tmp_path, cli):
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""
        plugins:
          discord:
            module: chatforge.adapters.discord
        adapters:
          discord:
            respond_to: [dm, everyone]
            gateway_url: https://gateway.example
    """))
    result = cli("config", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert ('config.yaml:7: adapters.discord.respond_to.1: must be "dm", "mention", "all" or a channel id '
            '(a long number), got "everyone"\n') in result.stderr
    assert "config.yaml:8: adapters.discord.gateway_url: must be a ws(s):// URL" in result.stderr


def test_a_long_reply_is_split_into_messages_with_balanced_code_fences(bot, fake):
    since = fake.mark()
    message = fake.dispatch_message("/long", ALICE, mention=True)
    wait_reply(fake, message, since)
    parts = fake.wait_until(lambda: (found := fake.sent_messages(CHANNEL_ID, since)) and
                            "The end." in content(found[-1]) and found, REPLY_WITHIN, "the last part")
    texts = [content(part) for part in parts]
    assert len(texts) >= 3 and sum(map(len, texts)) > 5000
    assert all(len(text) <= 2000 for text in texts)
    for text in texts:
        assert sum(1 for line in text.splitlines() if line.startswith("```")) % 2 == 0, text
    assert str(parts[0].body["message_reference"]["message_id"]) == message
    assert all("message_reference" not in part.body for part in parts[1:])
    joined = "\n".join(texts)
    assert all(f"line_{i} = {i} * 2" in joined for i in range(70))


def test_the_bot_ignores_itself_and_other_bots(bot, fake):
    since = fake.mark()
    own = fake.dispatch_message("/help", BOT_USER, mention=True)
    other = fake.dispatch_message("/help", OTHER_BOT, mention=True)
    other_dm = fake.dispatch_dm("/help", OTHER_BOT)
    control = fake.dispatch_dm("/help", ALICE)
    wait_reply(fake, control, since)
    time.sleep(QUIET_FOR)
    assert not replies_to(fake, own, since) and not replies_to(fake, other, since)
    assert not replies_to(fake, other_dm, since)
    assert len(fake.find("POST", r"/channels/\d+/messages", since)) == 1


def test_two_users_in_one_channel_keep_separate_memories(bot, fake):
    since = fake.mark()
    alice_line = fake.dispatch_message("alice likes green apples", ALICE, channel_id=THREAD_ID, mention=True)
    bob_line = fake.dispatch_message("bob prefers red cherries", BOB, channel_id=THREAD_ID, mention=True)
    wait_reply(fake, alice_line, since)
    wait_reply(fake, bob_line, since)
    alice_history = content(wait_reply(fake, fake.dispatch_message("/history", ALICE, channel_id=THREAD_ID), since))
    bob_history = content(wait_reply(fake, fake.dispatch_message("/history", BOB, channel_id=THREAD_ID), since))
    assert "You: alice likes green apples" in alice_history and "cherries" not in alice_history
    assert "You: bob prefers red cherries" in bob_history and "apples" not in bob_history
    # The thread's replies went to the thread itself.
    assert fake.sent_messages(THREAD_ID, since)


def test_the_bot_says_once_at_the_default_log_level_that_it_is_connected(bot, fake):
    def connected() -> list[str]:
        return [line for line in bot.stderr.splitlines() if "connected as" in line]

    fake.wait_until(connected, 10, "the announcement")  # on_ready follows READY once the guilds are in
    assert connected() == [f"chatforge: INFO: discord: connected as forgebot (id {BOT_USER['id']})"]


def test_the_bot_reconnects_after_the_gateway_closes(bot, fake):
    resumes, identifies = fake.resumes(), fake.identifies()
    fake.close_gateway(4000)
    fake.wait_until(lambda: fake.resumes() + fake.identifies() > resumes + identifies, 20, "a RESUME")
    since = fake.mark()
    message = fake.dispatch_dm("/sentiment what a great day", ALICE)
    assert content(wait_reply(fake, message, since)).startswith("positive")

    fake.close_gateway(1000)  # a plain close: discord.py waits a random backoff, then resumes
    fake.wait_until(lambda: fake.resumes() + fake.identifies() > resumes + identifies + 1, 20, "a second RESUME")
    since = fake.mark()
    message = fake.dispatch_message("/help", BOB, mention=True)
    assert content(wait_reply(fake, message, since)).startswith("Commands:")


# ---------------------------------------------------------------- streaming, respond_to: [mention]


@pytest.fixture(scope="module")
def stream_fake():
    with FakeDiscord(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def stream_bot(stream_fake, tmp_path_factory, tiny_gpt2, model_cache):
    folder = tmp_path_factory.mktemp("discord-stream")
    (folder / "paced.py").write_text(PACED_PLUGIN)
    running = Bot(folder, stream_fake, "respond_to: [mention]\nstream: true\nstream_interval: 0.3\n",
                  "paced:\n  module: ./paced.py\n", model=tiny_gpt2, cache=model_cache)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_only_mentions_are_answered_with_respond_to_mention(stream_bot, stream_fake):
    fake = stream_fake
    since = fake.mark()
    plain = fake.dispatch_message("is anybody listening?", ALICE)
    dm = fake.dispatch_dm("a private word", ALICE)
    mention = fake.dispatch_message("you are", ALICE, mention=True)
    fake.wait_until(lambda: fake.find("PATCH", r"/channels/\d+/messages/\d+", since,
                                      where=lambda r: content(r) == PACED_TEXT), REPLY_WITHIN, "the final text")
    time.sleep(QUIET_FOR)
    assert replies_to(fake, mention, since)
    assert not replies_to(fake, plain, since) and not replies_to(fake, dm, since)
    assert not fake.sent_messages(DM_CHANNEL_ID, since)


def test_streaming_edits_no_faster_than_the_interval_and_honours_a_429(stream_bot, stream_fake):
    fake = stream_fake
    fake.rate_limit_edits(1, retry_after=0.8)
    since = fake.mark()
    mention = fake.dispatch_message("stream to me", BOB, mention=True)
    first = wait_reply(fake, mention, since)
    message_path = rf"/channels/{CHANNEL_ID}/messages/\d+"
    fake.wait_until(lambda: fake.find("PATCH", message_path, since, where=lambda r: content(r) == PACED_TEXT),
                    REPLY_WITHIN, "the final text")
    assert len(fake.sent_messages(CHANNEL_ID, since)) == 1  # one message, then edits
    assert content(first) and PACED_TEXT.startswith(content(first).rstrip("… ").rstrip())
    edits = fake.find("PATCH", message_path, since)
    limited = [edit for edit in edits if edit.status == 429]
    assert len(limited) == 1 and len(edits) >= 3
    after = edits[edits.index(limited[0]) + 1]
    assert after.at - limited[0].at >= 0.8 - 0.05, "the edit after a 429 came before retry_after"
    times = [first.at] + [edit.at for edit in edits]
    assert all(later - earlier >= 0.3 - 0.05 for earlier, later in zip(times, times[1:])), times
    assert content(edits[-1]) == PACED_TEXT


# ---------------------------------------------------------------- shards: several processes, one bot


def announced(bot: Bot) -> list[str]:
    return [line for line in bot.stderr.splitlines() if "connected as" in line]


def test_two_processes_each_run_their_own_shards(tmp_path, tiny_gpt2, model_cache):
    """One config for both (shard_ids from the environment); each answers what Discord sends on its shard."""
    with FakeDiscord(TOKEN, shard_count=2) as fake:
        zero_channel, one_channel = fake.guild_on_shard(0)[1], fake.guild_on_shard(1)[1]
        assert one_channel == CHANNEL_ID  # the guild the slash command below comes from is on shard 1
        bots: dict[str, Bot] = {}
        statuses: dict[str, int] = {}
        try:
            for via, shard_ids in (("zero", "0"), ("one", "1")):
                (tmp_path / via).mkdir()
                bots[via] = Bot(tmp_path / via, fake, "shard_count: 2\nshard_ids: ${TEST_SHARD_IDS}\n",
                                model=tiny_gpt2, cache=model_cache, via=via, env={"TEST_SHARD_IDS": shard_ids})
            bots["zero"].wait_ready({0})
            bots["one"].wait_ready({1})
            assert fake.identified_shards("zero") == [[0, 2]] and fake.identified_shards("one") == [[1, 2]]

            since = fake.mark()
            on_zero = fake.dispatch_message("hello shard zero", ALICE, channel_id=zero_channel, mention=True)
            on_one = fake.dispatch_message("/sentiment I love shard one", BOB, channel_id=one_channel)
            dm = fake.dispatch_dm("/help", ALICE)  # direct messages come on shard 0
            interaction, token = fake.dispatch_slash("sentiment", BOB, "I love it", channel_id=one_channel)
            zero_reply, one_reply = wait_reply(fake, on_zero, since), wait_reply(fake, on_one, since)
            dm_reply = wait_reply(fake, dm, since)
            answer = fake.wait_for("POST", rf"/interactions/{interaction}/{re.escape(token)}/callback", since,
                                   timeout=REPLY_WITHIN)[0]
            assert (zero_reply.via, zero_reply.path) == ("zero", f"/channels/{zero_channel}/messages")
            assert (one_reply.via, one_reply.path) == ("one", f"/channels/{one_channel}/messages")
            assert content(one_reply).startswith("positive (+")
            assert dm_reply.via == "zero" and content(dm_reply).startswith("Commands:")
            # Slash commands are synced by the process with shard 0 only, but answered by every one.
            # The first /sentiment in a process loads its backends (VADER, langid): the answer may come deferred
            # ("thinking...", within Discord's 3 s) and then as a follow-up, from the same process.
            if answer.body["type"] == 5:
                follow_up = fake.wait_for("POST", rf"/webhooks/{APP_ID}/{re.escape(token)}", since,
                                          timeout=REPLY_WITHIN)[0]
                assert follow_up.via == "one"
                answered = follow_up.body["content"]
            else:
                answered = answer.body["data"]["content"]
            assert answer.via == "one" and answered.startswith("positive (+")
            fake.wait_for("PUT", r"/applications/\d+/commands", where=lambda r: r.via == "zero")
            time.sleep(QUIET_FOR)
            assert [r.via for r in fake.find("PUT", r"/applications/\d+/commands")] == ["zero"]
            assert all(len(replies_to(fake, message, since)) == 1 for message in (on_zero, on_one, dm))
            for bot in bots.values():  # discord.py calls on_ready 2 s after a shard's last guild came
                fake.wait_until(lambda bot=bot: announced(bot), 10, "the announcement")
        finally:
            for via, bot in bots.items():
                statuses[via] = bot.stop()
        assert statuses == {"zero": 0, "one": 0}, {via: bot.stderr for via, bot in bots.items()}
        assert announced(bots["zero"]) == [f"chatforge: INFO: discord: connected as forgebot (id {BOT_USER['id']}) "
                                           "on shard 0 (shard_count: 2)"]
        assert announced(bots["one"])[0].endswith(") on shard 1 (shard_count: 2)")
        for bot in bots.values():
            assert "Traceback" not in bot.stderr and TOKEN not in bot.stdout + bot.stderr


@pytest.mark.parametrize("keys, expected", [
    ("shard_ids: [0]",
     "config.yaml:7: adapters.discord.shard_ids: must come with shard_count (how many shards the bot has in "
     "all), got [0]"),
    ("shard_count: 2\nshard_ids: [0, 2]",
     "config.yaml:8: adapters.discord.shard_ids.1: must be a shard id from 0 to 1 (shard_count is 2), got 2"),
    ("shard_count: 3\nshard_ids: [2, 0, 2]",
     "config.yaml:8: adapters.discord.shard_ids: must list each shard once (2 is there twice), got [2, 0, 2]"),
    ("shard_count: 2\nshard_ids: []", "config.yaml:8: adapters.discord.shard_ids: must not be empty\n"),
    ("shard_count: 0", "config.yaml:7: adapters.discord.shard_count: must be greater than or equal to 1, got 0"),
], ids=["ids-without-count", "id-out-of-range", "duplicate-id", "no-ids", "no-shards"])
def test_config_check_names_bad_shard_keys(keys, expected, tmp_path, cli):
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""
        plugins:
          discord:
            module: chatforge.adapters.discord
        adapters:
          discord:
    """) + textwrap.indent(keys, "    ") + "\n")
    result = cli("config", "check", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr


# ---------------------------------------------------------------- tokens and signals


@pytest.mark.parametrize("token, gateway_close, expected", [
    ("", None, "config.yaml:19: adapters.discord.token: no token is set: the environment variable "
               "TEST_DISCORD_TOKEN is empty or not set\n"),
    ("wrong-token-Jh5Tq9Lm", None, "chatforge: adapters.discord.token: Discord rejected the token (401 Unauthorized)"),
    (TOKEN, 4004, "chatforge: adapters.discord.token: Discord rejected the token (gateway close 4004)"),
    (TOKEN, 4014, "chatforge: adapters.discord: Discord refused the Message Content intent; enable it in the "
                  "Developer Portal"),
], ids=["missing", "rejected", "rejected-by-gateway", "intent-refused"])
def test_a_token_or_intent_problem_exits_2_naming_the_key(token, gateway_close, expected, tmp_path, tiny_gpt2,
                                                          model_cache):
    with FakeDiscord(TOKEN) as server:
        server.close_on_identify = gateway_close
        running = Bot(tmp_path, server, "", model=tiny_gpt2, cache=model_cache, token=token)
        try:
            status = running.wait_exit(READY_WITHIN)
        finally:
            running.stop()
        output = running.stdout + running.stderr
        assert status == 2, output
        assert expected in running.stderr
        assert "Traceback" not in running.stderr and "WARNING" not in running.stderr, running.stderr
        assert TOKEN not in output and (not token or token not in output)
        if not token:
            assert not server.requests
        elif token != TOKEN:
            assert server.find("GET", "/users/@me")[0].status == 401


def test_sigterm_while_idle_exits_0_within_seconds(tmp_path, tiny_gpt2, model_cache):
    with FakeDiscord(TOKEN) as server:
        running = Bot(tmp_path, server, "", model=tiny_gpt2, cache=model_cache)
        try:
            running.wait_ready()
            running.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            status = running.wait_exit(10)
            elapsed = time.monotonic() - started
        finally:
            running.stop()
        assert status == 0, running.stderr
        assert elapsed < 5, elapsed
        assert "Traceback" not in running.stderr
        assert TOKEN not in running.stdout + running.stderr


@pytest.mark.filterwarnings("ignore:'audioop' is deprecated:DeprecationWarning")  # discord.py's own import
def test_endpoints_are_moved_per_client_and_discord_py_globals_are_untouched():
    """In-process: the adapter talks to the fake while discord.py's shared defaults stay Discord's."""
    import asyncio

    import discord

    from chatforge.adapters.discord import DEFAULT_API_BASE, DEFAULT_GATEWAY, DiscordAdapter, DiscordConfig
    from chatforge.commands import CommandRegistry

    class Engine:
        command_prefix = "/"
        commands = CommandRegistry()

    async def scenario(server: FakeDiscord) -> None:
        adapter = DiscordAdapter(Engine(), DiscordConfig(enabled=True, token=TOKEN, api_base=server.api_base,
                                                         gateway_url=server.gateway_url))
        running = asyncio.create_task(adapter.run())
        try:
            await asyncio.to_thread(server.wait_ready, 20)
            assert discord.http.Route.BASE == DEFAULT_API_BASE
            assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == DEFAULT_GATEWAY
            assert discord.http.Route("GET", "/users/@me").url == DEFAULT_API_BASE + "/users/@me"
            other = discord.Client(intents=discord.Intents.none())
            assert type(other.http).request is discord.http.HTTPClient.request  # not rewritten
            assert "request" not in vars(other.http) and "request" in vars(adapter.client.http)
        finally:
            await asyncio.wait_for(adapter.stop(), 10)
            await asyncio.wait_for(running, 10)

    with FakeDiscord(TOKEN) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 60))


# ---------------------------------------------------------------- Discord out of reach


class Engine:
    """What the adapter needs of the engine to connect (no message is answered here)."""

    command_prefix = "/"

    def __init__(self) -> None:
        from chatforge.commands import CommandRegistry

        self.commands = CommandRegistry()


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeDiscordOnPort(FakeDiscord):
    """The fake Discord on a port chosen beforehand: Discord coming back where the bot expects it."""

    def __init__(self, token: str, port: int) -> None:
        super().__init__(token)
        self.wanted_port = port

    async def _start_site(self) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.wanted_port).start()
        self.port = self.wanted_port


def retries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chatforge.adapters.discord"
            and r.levelname == "WARNING" and r.getMessage().startswith("cannot reach Discord")]


async def wait_for(condition, timeout: float, what: str) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


def discord_config(api_port: int, gateway_port: int, **keys):
    from chatforge.adapters.discord import DiscordConfig

    return DiscordConfig(enabled=True, token=TOKEN, api_base=f"http://127.0.0.1:{api_port}/api/v10",
                         gateway_url=f"ws://127.0.0.1:{gateway_port}/gateway", **keys)


def test_an_unreachable_discord_is_retried_with_backoff_until_stopped(caplog):
    import asyncio

    from chatforge.adapters.discord import DiscordAdapter

    async def scenario() -> None:
        port = closed_port()
        adapter = DiscordAdapter(Engine(), discord_config(port, port))
        running = asyncio.create_task(adapter.run())
        await wait_for(lambda: len(retries(caplog)) >= 2 or running.done(), 10, "two retries")
        assert not running.done()  # it keeps trying: never a silent return
        started = time.monotonic()
        await asyncio.wait_for(adapter.stop(), 5)
        await asyncio.wait_for(running, 5)  # in the middle of a 2 s wait: it ends at once, without an error
        assert time.monotonic() - started < 1
        first, second = retries(caplog)[:2]
        assert f"127.0.0.1:{port}" in first and "ClientConnectorError" in first
        assert first.endswith("retrying in 1 s") and second.endswith("retrying in 2 s")
        assert TOKEN not in caplog.text

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_discord_coming_up_later_is_connected_to_and_announced(caplog):
    import asyncio

    from chatforge.adapters.discord import DiscordAdapter

    async def scenario() -> None:
        port = closed_port()
        adapter = DiscordAdapter(Engine(), discord_config(port, port))
        running = asyncio.create_task(adapter.run())
        try:
            await wait_for(lambda: retries(caplog) or running.done(), 10, "a retry")
            with FakeDiscordOnPort(TOKEN, port) as server:
                await asyncio.to_thread(server.wait_ready, 15)
                await wait_for(lambda: "discord: connected as forgebot" in caplog.text, 5, "the announcement")
                await asyncio.wait_for(adapter.stop(), 10)
                await asyncio.wait_for(running, 10)
        finally:
            running.cancel()
        [announced] = [r for r in caplog.records if "connected as" in r.getMessage()]
        assert announced.name == "chatforge" and announced.levelname == "INFO"

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_session_that_ends_unasked_is_reconnected_never_a_silent_return(caplog):
    import asyncio

    from chatforge.adapters.discord import DiscordAdapter

    async def scenario(server: FakeDiscord) -> None:
        adapter = DiscordAdapter(Engine(), discord_config(server.port, server.port))
        running = asyncio.create_task(adapter.run())
        await asyncio.to_thread(server.wait_ready, 15)
        await adapter.client.close()  # as if discord.py had closed the client by itself
        await asyncio.to_thread(server.wait_until, lambda: server.identifies() >= 2, 10, "a second IDENTIFY")
        assert not running.done()
        await asyncio.wait_for(adapter.stop(), 5)
        await asyncio.wait_for(running, 5)
        assert "the Discord client closed without being asked to; reconnecting in 1 s" in caplog.text

    with FakeDiscord(TOKEN) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 30))


@pytest.mark.parametrize("shards", [{}, {"shard_count": 2}], ids=["unsharded", "sharded"])
def test_an_unreachable_gateway_is_retried_too(shards, caplog):
    import asyncio

    from chatforge.adapters.discord import DiscordAdapter

    async def scenario(server: FakeDiscord) -> None:
        adapter = DiscordAdapter(Engine(), discord_config(server.port, closed_port(), **shards))
        running = asyncio.create_task(adapter.run())
        await wait_for(lambda: len(retries(caplog)) >= 2 or running.done(), 10, "two retries")
        assert not running.done()
        await asyncio.wait_for(adapter.stop(), 5)
        await asyncio.wait_for(running, 5)
        assert all(message.startswith("cannot reach Discord's gateway (") for message in retries(caplog))
        assert len(server.find("GET", "/users/@me")) >= 2  # each attempt logs in afresh
        assert "Traceback" not in caplog.text and "Attempting a reconnect" not in caplog.text

    with FakeDiscord(TOKEN) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 30))


def test_one_process_runs_every_shard_when_shard_ids_is_left_out(caplog):
    import asyncio

    from chatforge.adapters.discord import DiscordAdapter

    async def scenario(server: FakeDiscord) -> None:
        adapter = DiscordAdapter(Engine(), discord_config(server.port, server.port, shard_count=2))
        running = asyncio.create_task(adapter.run())
        try:
            # discord.py waits 5 s before each IDENTIFY after a process's first (Discord's identify rate limit).
            await asyncio.to_thread(server.wait_until, lambda: server.ready_shards() == {0, 1}, 30,
                                    "READY on both shards")
            await wait_for(lambda: "discord: connected as" in caplog.text, 10, "the announcement")
            assert not running.done()
        finally:
            await asyncio.wait_for(adapter.stop(), 10)
            await asyncio.wait_for(running, 10)
        assert server.identified_shards() == [[0, 2], [1, 2]]
        assert len(server.find("PUT", r"/applications/\d+/commands")) == 1
        assert "connected as forgebot (id 900000000000000001) on shards 0, 1 (shard_count: 2)" in caplog.text
        assert "Traceback" not in caplog.text

    with FakeDiscord(TOKEN, shard_count=2) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 60))


@pytest.mark.parametrize("code, expected", [
    (4004, "adapters.discord.token: Discord rejected the token (gateway close 4004)"),
    (4014, "adapters.discord: Discord refused the Message Content intent"),
])
def test_a_gateway_refusal_is_an_adapter_error_when_sharded_too(code, expected):
    import asyncio

    from chatforge.adapter import AdapterError
    from chatforge.adapters.discord import DiscordAdapter

    async def scenario(server: FakeDiscord) -> None:
        adapter = DiscordAdapter(Engine(), discord_config(server.port, server.port, shard_count=2, shard_ids=[1]))
        with pytest.raises(AdapterError) as refused:
            await asyncio.wait_for(adapter.run(), 15)
        assert str(refused.value).startswith(expected)
        assert server.identified_shards() == [[1, 2]]

    with FakeDiscord(TOKEN, shard_count=2) as server:
        server.close_on_identify = code
        asyncio.run(asyncio.wait_for(scenario(server), 30))


def test_stopping_while_shards_are_launched_is_prompt():
    """discord.py waits 5 s before each IDENTIFY after the first; stop() does not wait them out."""
    import asyncio

    from chatforge.adapters.discord import DiscordAdapter

    async def scenario(server: FakeDiscord) -> None:
        adapter = DiscordAdapter(Engine(), discord_config(server.port, server.port, shard_count=3))
        running = asyncio.create_task(adapter.run())
        await asyncio.to_thread(server.wait_until, lambda: server.ready_shards() == {0}, 15, "READY on shard 0")
        started = time.monotonic()
        await asyncio.wait_for(adapter.stop(), 10)
        await asyncio.wait_for(running, 10)
        assert time.monotonic() - started < 2
        assert server.identified_shards() == [[0, 3]]
        await wait_for(lambda: not heartbeats() - before, 5, "the shards' heartbeat threads to end")

    def heartbeats() -> set:
        return {thread for thread in threading.enumerate() if thread.name.startswith("keep-alive-handler")}

    before = heartbeats()
    with FakeDiscord(TOKEN, shard_count=3) as server:
        asyncio.run(asyncio.wait_for(scenario(server), 30))


def test_chatforge_run_keeps_trying_an_unreachable_discord_and_stops_on_sigterm(tmp_path, tiny_gpt2, model_cache):
    port = closed_port()

    class Nowhere:
        api_base = f"http://127.0.0.1:{port}/api/v10"
        gateway_url = f"ws://127.0.0.1:{port}/gateway"

    running = Bot(tmp_path, Nowhere(), "", model=tiny_gpt2, cache=model_cache)
    try:
        deadline = time.monotonic() + READY_WITHIN
        while running.stderr.count("cannot reach Discord") < 2:
            assert running.process.poll() is None, f"exited with {running.process.returncode}:\n{running.stderr}"
            assert time.monotonic() < deadline, running.stderr
            time.sleep(0.2)
        running.process.send_signal(signal.SIGTERM)
        status = running.wait_exit(10)
    finally:
        running.stop()
    assert status == 0, running.stderr
    warnings = [line for line in running.stderr.splitlines() if "cannot reach Discord" in line]
    assert warnings[0].startswith("chatforge.adapters.discord: WARNING: cannot reach Discord (")
    assert "Traceback" not in running.stderr and TOKEN not in running.stderr


def test_a_flood_in_one_channel_is_answered_busy_beyond_max_pending(tmp_path, tiny_gpt2, model_cache):
    """Every message being answered or delivered counts toward limits.max_pending; one busy answer per flood."""
    with FakeDiscord(TOKEN) as fake:
        (tmp_path / "paced.py").write_text(PACED_PLUGIN)
        running = Bot(tmp_path, fake, "respond_to: [all]\n", "paced:\n  module: ./paced.py\n",
                      model=tiny_gpt2, cache=model_cache, limits_yaml="max_pending: 4\n")
        try:
            running.wait_ready()
            since = fake.mark()
            for n in range(120):
                fake.dispatch_message(f"flood {n}", ALICE)
            fake.wait_until(lambda: len([r for r in fake.sent_messages(CHANNEL_ID, since)
                                         if content(r) == PACED_TEXT]) >= 4, REPLY_WITHIN, "the admitted answers")
            time.sleep(3)  # an answer that was not admitted would have come by now (1.5 s each)
            sent = [content(r) for r in fake.sent_messages(CHANNEL_ID, since)]
        finally:
            status = running.stop()
        assert status == 0, running.stderr
        assert sent.count(PACED_TEXT) == 4, sent
        assert sent.count("I'm busy answering a lot of messages right now; please try again in a minute.") == 1
        assert len(sent) == 5, sent
        assert "Traceback" not in running.stderr
