"""What an operator meets first: `config check` in one pass, tokens checked before the model loads,
and a wrong `--adapter` blamed on the command line. No model is loaded and no network is used here.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from chatforge.app import check_tokens, choose_adapters
from chatforge.config import ConfigError, UsageError, load_settings
from chatforge.plugin_manager import PluginHost

# Variables no test machine sets: the tokens below are empty.
NO_ENV = {"CF_TEST_UNSET_DISCORD": "", "CF_TEST_UNSET_TELEGRAM": ""}


def write(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_lines(stderr: str, folder: Path) -> list[str]:
    """The issues listed, with the config's folder left out."""
    lines = stderr.replace(f"{folder.resolve()}/", "").splitlines()
    assert lines[0] == "chatforge: invalid config:", stderr
    return lines[1:]


def test_config_check_reports_core_plugin_adapter_and_token_errors_in_one_pass_by_line(cli, tmp_path):
    write(tmp_path, """
        generator:
          max_new_tokens: lots
        memory:
          scpoe: chat
        bot:
          command_prefix: ''
        plugins:
          sentiment:
            neutral_below: 2
        adapters:
          discord:
            enabled: true
            respond_to: [dm, everyone]
          telegram:
            enabled: true
            token: ${CF_TEST_UNSET_TELEGRAM:-}
    """)
    result = cli("config", "check", cwd=tmp_path, env=NO_ENV)
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr, tmp_path) == [
        'config.yaml:2: generator.max_new_tokens: must be a positive integer, got "lots"',
        'config.yaml:4: memory.scpoe: unknown key (did you mean "scope"?)',
        "config.yaml:6: bot.command_prefix: must not be empty",
        "config.yaml:9: plugins.sentiment.neutral_below: must be less than or equal to 1, got 2",
        "config.yaml:11: adapters.discord.token: no token is set; put it in the environment as DISCORD_TOKEN "
        "and write token: ${DISCORD_TOKEN}",
        'config.yaml:13: adapters.discord.respond_to.1: must be "dm", "mention", "all" or a channel id '
        '(a long number), got "everyone"',
        "config.yaml:16: adapters.telegram.token: no token is set: the environment variable "
        "CF_TEST_UNSET_TELEGRAM is empty or not set",
    ]
    assert "Traceback" not in result.stderr


def test_config_check_fails_on_an_enabled_adapter_without_a_token_only(cli, tmp_path):
    write(tmp_path, """
        adapters:
          discord:
            token: ${CF_TEST_UNSET_DISCORD:-}
          telegram:
            enabled: true
    """)
    result = cli("config", "check", cwd=tmp_path, env=NO_ENV)
    assert result.returncode == 2
    assert error_lines(result.stderr, tmp_path) == [
        "config.yaml:4: adapters.telegram.token: no token is set; put it in the environment as "
        "TELEGRAM_BOT_TOKEN and write token: ${TELEGRAM_BOT_TOKEN}"]

    write(tmp_path, "adapters:\n  discord:\n    token: ${CF_TEST_UNSET_DISCORD:-}\n")
    result = cli("config", "check", cwd=tmp_path, env=NO_ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("config.yaml: OK")


def test_every_missing_token_is_reported_before_the_model_loads(cli, tmp_path):
    write(tmp_path, """
        generator:
          model: ./there-is-no-such-model
          fallback: false
        adapters:
          discord:
            enabled: true
            token: ${CF_TEST_UNSET_DISCORD:-}
          telegram:
            enabled: true
    """)
    result = cli("run", cwd=tmp_path, env=NO_ENV, timeout=60)
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr, tmp_path) == [
        "config.yaml:7: adapters.discord.token: no token is set: the environment variable CF_TEST_UNSET_DISCORD "
        "is empty or not set",
        "config.yaml:8: adapters.telegram.token: no token is set; put it in the environment as "
        "TELEGRAM_BOT_TOKEN and write token: ${TELEGRAM_BOT_TOKEN}",
    ]
    assert "model" not in result.stderr.lower()  # the model was not even looked for

    result = cli("run", "--adapter", "telegram", cwd=tmp_path, env=NO_ENV, timeout=60)
    assert result.returncode == 2
    assert [line.split(": ")[1] for line in error_lines(result.stderr, tmp_path)] == ["adapters.telegram.token"]


@pytest.mark.parametrize("command", [["run", "--adapter", "slack"], ["run", "-a", "console", "-a", "slack"]])
def test_an_unknown_adapter_on_the_command_line_is_blamed_on_the_command_line(cli, tmp_path, command):
    write(tmp_path, "bot:\n  name: robo\n")
    result = cli(*command, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ('chatforge: --adapter slack: no adapter named "slack" '
                             "(available: console, discord, http, telegram)\n")


def test_check_tokens_lists_every_chosen_adapter_without_one(tmp_path):
    settings = load_settings(write(tmp_path, """
        adapters:
          console:
            enabled: true
          discord:
            enabled: true
            token: "  "
          telegram:
            enabled: true
            token: "123:abc"
    """))
    host = PluginHost(settings)
    assert host.load() == []
    names = choose_adapters(settings, host, None)
    assert names == ["console", "discord", "telegram"]
    with pytest.raises(ConfigError) as excinfo:
        check_tokens(settings, host, names)
    assert [(issue.path, issue.line) for issue in excinfo.value.issues] == [("adapters.discord.token", 6)]
    check_tokens(settings, host, ["console", "telegram"])  # nothing missing: no error
    with pytest.raises(UsageError, match='^--adapter irc: no adapter named "irc"'):
        choose_adapters(settings, host, ["irc"])
