"""`chatforge` as a user runs it: pipe-mode chat on a tiny GPT-2, config errors, plugin faults."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

@pytest.fixture
def tiny_config(tmp_path, tiny_gpt2, model_cache) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        generator:
          model: {tiny_gpt2}
          temperature: 0
          max_new_tokens: 12
          cache_dir: {model_cache}
        memory:
          path: memory.sqlite3
    """))
    return path


def test_pipe_mode_answers_each_line_and_exits_zero(cli, tiny_config):
    result = cli("chat", "--config", str(tiny_config), stdin="hello there\n/help\n/history\n/reset\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Commands:\n" in out and "\n/help - list the commands" in out
    assert "I remember 2 turns of this conversation:\nYou: hello there\nchatforge: " in out
    assert "Done: I forgot this conversation (2 turns)." in out
    assert "Traceback" not in result.stderr


def test_memory_persists_between_runs_in_the_sqlite_file(cli, tiny_config):
    assert cli("chat", "-c", str(tiny_config), stdin="remember me\n").returncode == 0
    assert (tiny_config.parent / "memory.sqlite3").is_file()
    result = cli("chat", "-c", str(tiny_config), stdin="/history\n")
    assert "You: remember me" in result.stdout


def test_config_from_the_environment_variable(cli, tiny_config, tmp_path):
    result = cli("chat", stdin="/history\n", cwd=tmp_path, env={"CHATFORGE_CONFIG": str(tiny_config)})
    assert result.returncode == 0 and "I don't remember anything" in result.stdout


@pytest.mark.parametrize("yaml_text, expected", [
    ("generator:\n  max_new_tokens: lots\n",
     'config.yaml:2: generator.max_new_tokens: must be a positive integer, got "lots"'),
    ("generator:\n  temprature: 0\n",
     'config.yaml:2: generator.temprature: unknown key (did you mean "temperature"?)'),
    ("memory:\n  scope: everyone\n", "config.yaml:2: memory.scope: must be 'user' or 'chat'"),
    ("adapters:\n  console:\n    token: ${NO_SUCH_VARIABLE_X}\n",
     "config.yaml:3: adapters.console.token: environment variable NO_SUCH_VARIABLE_X is not set"),
    ("generator: [1, 2\n", "config.yaml:2: (top level): not valid YAML"),
])
@pytest.mark.parametrize("command", [["chat"], ["config", "check"], ["run"]])
def test_bad_config_exits_2_naming_the_yaml_path(cli, tmp_path, yaml_text, expected, command):
    (tmp_path / "config.yaml").write_text(yaml_text)
    result = cli(*command, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_accepts_the_shipped_config(cli):
    root = Path(__file__).resolve().parents[1]
    result = cli("config", "check", "--config", str(root / "config.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("config.yaml: OK")


def test_a_missing_config_file_is_named(cli, tmp_path):
    result = cli("config", "check", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml: (top level): config file not found" in result.stderr


RAISING_PLUGIN = """
from chatforge import hookimpl

@hookimpl
def chatforge_preprocess(message):
    raise RuntimeError("moderation service down")
"""


def test_a_plugin_raising_in_a_hook_logs_one_line_and_the_chat_goes_on(cli, tiny_config):
    (tiny_config.parent / "moderation.py").write_text(RAISING_PLUGIN)
    with tiny_config.open("a") as config:
        config.write("plugins:\n  moderation:\n    module: moderation.py\n")
    result = cli("chat", "-c", str(tiny_config), stdin="/help\n/history\n")
    assert result.returncode == 0
    assert "Commands:" in result.stdout and "I don't remember anything" in result.stdout
    failures = [line for line in result.stderr.splitlines() if "moderation" in line]
    assert len(failures) == 2  # one line per message it failed on
    assert "plugin 'moderation' failed in chatforge_preprocess: RuntimeError: moderation service down" in failures[0]


def test_strict_mode_stops_on_a_broken_plugin(cli, tiny_config):
    (tiny_config.parent / "broken.py").write_text("raise ImportError('missing dependency: frobnicate')\n")
    with tiny_config.open("a") as config:
        config.write("plugins:\n  broken:\n    module: broken.py\n")
    relaxed = cli("chat", "-c", str(tiny_config), stdin="/help\n")
    assert relaxed.returncode == 0 and "Commands:" in relaxed.stdout
    strict = cli("chat", "--strict", "-c", str(tiny_config), stdin="/help\n")
    assert strict.returncode == 1
    assert "plugin 'broken' failed in import: ImportError: missing dependency: frobnicate" in strict.stderr


def test_plugins_lists_sources_hooks_commands_and_errors(cli, tiny_config):
    (tiny_config.parent / "broken.py").write_text("1 / 0\n")
    with tiny_config.open("a") as config:
        config.write("plugins:\n  broken:\n    module: broken.py\n")
    result = cli("plugins", "-c", str(tiny_config))
    assert result.returncode == 0
    assert "core  [builtin: chatforge.builtin_commands]" in result.stdout
    assert "  commands: /help, /history, /reset, /forget, /stats" in result.stdout
    assert "broken  [config: broken.py]" in result.stdout
    assert "  error:    import: ZeroDivisionError: division by zero" in result.stdout


def test_run_starts_the_adapters_named_on_the_command_line(cli, tiny_config):
    result = cli("run", "--adapter", "console", "-c", str(tiny_config), stdin="/reset\n")
    assert result.returncode == 0 and "nothing to forget" in result.stdout
    unknown = cli("run", "--adapter", "irc", "-c", str(tiny_config))
    assert unknown.returncode == 2
    assert '--adapter irc: no adapter named "irc" (available: console, discord, http, telegram)' in unknown.stderr


@pytest.mark.parametrize("command", [[], ["chat"], ["run"], ["plugins"], ["config", "check"]])
def test_help_on_each_command(cli, command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and "usage: chatforge" in result.stdout


def test_sigterm_stops_chat_cleanly_while_waiting_for_input(tiny_config):
    import signal
    import sqlite3
    import time

    from conftest import CHATFORGE

    process = subprocess.Popen([CHATFORGE, "chat", "-c", str(tiny_config)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        process.stdin.write("/reset\nhello there\n")
        process.stdin.flush()  # stdin stays open: the bot is waiting for more
        deadline = time.monotonic() + 120
        database = tiny_config.parent / "memory.sqlite3"
        while time.monotonic() < deadline:
            if database.exists():
                reader = sqlite3.connect(database)
                turns = reader.execute("SELECT count(*) FROM turns").fetchone()[0]
                reader.close()
                if turns == 2:
                    break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "nothing to forget" in out
    assert "Traceback" not in err
    assert not (tiny_config.parent / "memory.sqlite3-wal").exists() or \
        (tiny_config.parent / "memory.sqlite3-wal").stat().st_size == 0  # closed cleanly: WAL checkpointed


SECRET_PLUGIN = """
import logging
from pydantic import SecretStr
from chatforge import PluginConfig, hookimpl

class Config(PluginConfig):
    api_key: SecretStr

@hookimpl
def chatforge_config_model():
    return Config

@hookimpl
def chatforge_startup(config):
    logging.getLogger("leaky").warning("connecting with key %s to https://api.example/%s/x",
                                       config.api_key.get_secret_value(), config.api_key.get_secret_value())
    raise RuntimeError("auth failed for " + config.api_key.get_secret_value())
"""


def test_secrets_never_reach_the_logs(cli, tiny_config):
    (tiny_config.parent / "leaky.py").write_text(SECRET_PLUGIN)
    with tiny_config.open("a") as config:
        config.write("plugins:\n  leaky:\n    module: leaky.py\n    api_key: ${LEAKY_KEY}\n")
    secret = "s3cr3t-T0KEN-value-123"
    result = cli("chat", "-c", str(tiny_config), stdin="/help\n", env={"LEAKY_KEY": secret})
    assert result.returncode == 0
    assert "connecting with key *** to https://api.example/***/x" in result.stderr
    assert "auth failed for ***" in result.stderr
    assert secret not in result.stderr and secret not in result.stdout


def test_a_bad_secret_value_is_never_echoed(cli, tmp_path):
    (tmp_path / "config.yaml").write_text("adapters:\n  telegram:\n    token: [\"s3cret-in-a-list\"]\n")
    result = cli("config", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert "config.yaml:3: adapters.telegram.token: must be a valid string" in result.stderr
    assert "s3cret-in-a-list" not in result.stderr


# ---------------------------------------------------------------- pipe mode for scripts

def test_pipe_mode_answers_every_line_in_order_without_rate_limits(cli, tiny_config):
    """The console is the operator's own terminal: no per-user rate limit, no flood guard."""
    lines = "".join(f"/sentiment line {i} I am happy\n" for i in range(300))
    result = cli("chat", "-c", str(tiny_config), stdin=lines)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 300, replies[:8]
    assert all(re.fullmatch(r"(positive|neutral|negative) \([+-]\d\.\d\d\)", reply) for reply in replies)


def test_json_mode_prints_one_object_per_input_line(cli, tiny_config):
    import json

    inputs = ["hello there", "/history", "", "/reset", "/nosuchcommand"]
    result = cli("chat", "--json", "-c", str(tiny_config), stdin="".join(line + "\n" for line in inputs))
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [item["input"] for item in objects] == inputs
    assert objects[0]["source"] == "generator" and objects[0]["reply"]
    assert objects[1]["reply"].startswith("I remember 2 turns of this conversation:\nYou: hello there\n")
    assert objects[1]["source"] == "/history"
    assert objects[2] == {"input": "", "reply": None, "source": None}  # the bot stays silent
    assert objects[3]["reply"] == "Done: I forgot this conversation (2 turns)."
    assert objects[4]["source"] == "engine" and "Unknown command /nosuchcommand" in objects[4]["reply"]


def test_pipe_mode_can_talk_as_its_own_user(cli, tiny_config):
    assert cli("chat", "-c", str(tiny_config), stdin="hello there\n").returncode == 0
    scripted = cli("chat", "--user", "nightly-job", "-c", str(tiny_config), stdin="/history\n")
    assert "I don't remember anything of this conversation yet." in scripted.stdout
    mine = cli("chat", "-c", str(tiny_config), stdin="/history\n")
    assert "You: hello there" in mine.stdout


def test_a_line_over_4_mib_gets_a_polite_refusal_and_later_lines_are_answered(cli, tiny_config):
    huge = "x" * (5 * 2**20)
    result = cli("chat", "-c", str(tiny_config), stdin=f"/sentiment I am happy\n{huge}\n/sentiment I am happy\n")
    assert result.returncode == 0, result.stderr[-2000:]
    replies = result.stdout.splitlines()
    assert replies[0].startswith("positive") and replies[2].startswith("positive"), replies
    assert replies[1] == ("Your message is 5,242,880 characters long; I read at most 4,000. "
                          "Please send a shorter one.")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- plugin faults, with and without --strict

FAULTY_PLUGIN = '''
import argparse
from chatforge import hookimpl

def boom(ctx):
    raise ValueError("boom went the command")

def opts(ctx):
    parser = argparse.ArgumentParser(prog="/opts")
    parser.add_argument("--n", type=int)
    return f"n is {parser.parse_args(ctx.args.split()).n}"

def leave(ctx):
    raise SystemExit(3)

@hookimpl
def chatforge_register_commands(register):
    register("boom", boom, help="raise")
    register("opts", opts, help="parse options like a CLI", usage="--n N")
    register("leave", leave, help="raise SystemExit")

@hookimpl
def chatforge_handle_text(message):
    if message.text.startswith("claim"):
        raise RuntimeError("the handler broke")
'''


@pytest.fixture
def faulty_config(tiny_config):
    (tiny_config.parent / "faulty.py").write_text(FAULTY_PLUGIN)
    with tiny_config.open("a") as config:
        config.write("plugins:\n  faulty:\n    module: faulty.py\n")
    return tiny_config


def test_without_strict_a_failing_plugin_is_named_in_the_apology_and_the_bot_goes_on(cli, faulty_config):
    result = cli("chat", "--json", "-c", str(faulty_config), stdin="/boom\nclaim this\n/help\n")
    assert result.returncode == 0, result.stderr
    import json

    replies = [json.loads(line)["reply"] for line in result.stdout.splitlines()]
    assert replies[0] == "Sorry, something went wrong while answering (the faulty plugin failed). Please try again."
    assert replies[1] == replies[0]  # a broken free-text handler is not silently passed over to the model
    assert replies[2].startswith("Commands:")
    assert "plugin 'faulty' failed in chatforge_handle_text: RuntimeError: the handler broke" in result.stderr


@pytest.mark.parametrize("line, where", [("/boom", "/boom: ValueError: boom went the command"),
                                         ("claim this", "chatforge_handle_text: RuntimeError: the handler broke")])
def test_strict_mode_stops_with_status_1_naming_the_plugin(cli, faulty_config, line, where):
    result = cli("chat", "--strict", "-c", str(faulty_config), stdin=f"{line}\n/help\n")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"chatforge: plugin 'faulty' failed in {where}" in result.stderr
    assert "Commands:" not in result.stdout and "Traceback" not in result.stderr


def test_a_plugin_that_exits_is_a_plugin_failure_not_the_end_of_the_bot(cli, faulty_config):
    result = cli("chat", "-c", str(faulty_config), stdin="/opts --n 4\n/opts --n notanumber\n/leave\n/help\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("n is 4\n")
    assert out.count("(the faulty plugin failed)") == 2 and "Commands:" in out
    assert "plugin 'faulty' failed in /opts: SystemExit: 2" in result.stderr
    assert "plugin 'faulty' failed in /leave: SystemExit: 3" in result.stderr


FAILING_ADAPTER = '''
import asyncio
from chatforge import hookimpl
from chatforge.adapter import Adapter

class Flaky(Adapter):
    name = "flaky"

    async def run(self):
        await asyncio.sleep(0.2)
        raise ConnectionError("the platform went away for good")

@hookimpl
def chatforge_register_adapters(register):
    register(Flaky)
'''


def test_an_adapter_that_fails_for_good_stops_the_bot_with_status_1(cli, tiny_config):
    (tiny_config.parent / "flaky.py").write_text(FAILING_ADAPTER)
    with tiny_config.open("a") as config:
        config.write("plugins:\n  flaky:\n    module: flaky.py\n")
    result = cli("run", "--adapter", "flaky", "--adapter", "console", "-c", str(tiny_config), stdin="")
    assert result.returncode == 1, result.stderr
    assert "chatforge: the flaky adapter stopped: ConnectionError: the platform went away for good" in result.stderr
