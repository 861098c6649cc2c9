"""Tests for chatforge.commands: parsing a message into a command, and the registry."""

from __future__ import annotations

import pytest

from chatforge.commands import Command, CommandRegistry, parse_command


def handler(context):  # pragma: no cover - never called by these tests
    return "ok"


def make(name: str, help: str = "Does a thing.", plugin: str = "core", usage: str = "") -> Command:
    return Command(name=name, handler=handler, help=help, plugin=plugin, usage=usage)


# ------------------------------------------------------------------ parse_command

@pytest.mark.parametrize(
    "text, expected",
    [
        ("/help", ("help", "")),
        ("/Summarize  some text", ("summarize", "some text")),
        ("/start@MyBot hi", ("start", "hi")),
        ("/start@MyBot", ("start", "")),
        ("/HELP", ("help", "")),
        ("/top10 now", ("top10", "now")),
        ("/reset   ", ("reset", "")),
        ("/echo   padded args   ", ("echo", "padded args")),
        ("/echo\targs after a tab", ("echo", "args after a tab")),
    ],
)
def test_parse_command_commands(text, expected):
    assert parse_command(text) == expected


def test_parse_command_keeps_multi_line_arguments():
    assert parse_command("/note first line\nsecond line\n  third") == (
        "note",
        "first line\nsecond line\n  third",
    )


def test_parse_command_arguments_may_start_on_the_next_line():
    assert parse_command("/summarize\nline one\nline two") == ("summarize", "line one\nline two")


@pytest.mark.parametrize(
    "text",
    [
        "/ 2",  # a slash followed by a space is text
        "/:)",  # a smiley
        "/2fa",  # a name must start with a letter
        "/",  # nothing after the prefix
        "/@bot",  # only a bot mention
        "hello",
        "",
        " /help",  # the prefix must be the very first character
        "say /help",
    ],
)
def test_parse_command_not_a_command(text):
    assert parse_command(text) is None


def test_parse_command_custom_prefix():
    assert parse_command("!help", prefix="!") == ("help", "")
    assert parse_command("!Roll 2d6", prefix="!") == ("roll", "2d6")
    # With a custom prefix, the default one is ordinary text.
    assert parse_command("/help", prefix="!") is None
    assert parse_command("! 1", prefix="!") is None


def test_parse_command_multi_character_prefix():
    assert parse_command("cf!ping  x", prefix="cf!") == ("ping", "x")
    assert parse_command("cf ping", prefix="cf!") is None


# ------------------------------------------------------------------ Command

def test_signature_without_usage():
    assert make("help").signature() == "/help"


def test_signature_with_usage_and_prefix():
    command = make("remind", usage="<minutes> <text>")
    assert command.signature() == "/remind <minutes> <text>"
    assert command.signature("!") == "!remind <minutes> <text>"


# ------------------------------------------------------------------ CommandRegistry.add

@pytest.mark.parametrize(
    "name",
    [
        "",
        "Help",  # upper case
        "1abc",  # starts with a digit
        "_abc",  # starts with an underscore
        "has space",
        "has-dash",
        "a" * 33,  # too long
        "help\n",  # a trailing newline must not slip through
        "/help",
        "hélp",
    ],
)
def test_add_rejects_bad_names(name):
    registry = CommandRegistry()
    with pytest.raises(ValueError, match="invalid command name"):
        registry.add(make(name))
    assert registry.commands == {}


@pytest.mark.parametrize("name", ["a", "help", "top_10", "x" * 32])
def test_add_accepts_good_names(name):
    registry = CommandRegistry()
    command = make(name)
    registry.add(command)
    assert registry.get(name) is command


@pytest.mark.parametrize("help_text", ["", "   ", "\n", "first line\nsecond line", "a\n\nb"])
def test_add_rejects_empty_or_multi_line_help(help_text):
    registry = CommandRegistry()
    with pytest.raises(ValueError, match="one-line help"):
        registry.add(make("thing", help=help_text))
    assert registry.get("thing") is None


def test_add_accepts_help_with_surrounding_whitespace():
    registry = CommandRegistry()
    registry.add(make("thing", help="  Does a thing.\n"))
    assert registry.get("thing") is not None


def test_add_rejects_duplicate_and_names_the_owner():
    registry = CommandRegistry()
    first = make("weather", plugin="forecast")
    registry.add(first)
    with pytest.raises(ValueError, match=r"/weather .*'forecast'"):
        registry.add(make("weather", plugin="other"))
    # The first plugin keeps the name.
    assert registry.get("weather") is first
    assert registry.get("weather").plugin == "forecast"


def test_duplicate_from_the_same_plugin_is_rejected_too():
    registry = CommandRegistry()
    registry.add(make("ping", plugin="p"))
    with pytest.raises(ValueError, match="already registered"):
        registry.add(make("ping", plugin="p"))


# ------------------------------------------------------------------ lookup and iteration

def test_iteration_is_sorted_by_name():
    registry = CommandRegistry()
    for name in ["zeta", "alpha", "mid", "beta_2", "beta"]:
        registry.add(make(name))
    assert [command.name for command in registry] == ["alpha", "beta", "beta_2", "mid", "zeta"]
    # Iterating twice gives the same result (a fresh iterator each time).
    assert [command.name for command in registry] == ["alpha", "beta", "beta_2", "mid", "zeta"]


def test_get_unknown_is_none():
    assert CommandRegistry().get("nope") is None


def test_by_plugin():
    registry = CommandRegistry()
    registry.add(make("a", plugin="one"))
    registry.add(make("b", plugin="two"))
    registry.add(make("c", plugin="one"))
    assert sorted(command.name for command in registry.by_plugin("one")) == ["a", "c"]
    assert [command.name for command in registry.by_plugin("two")] == ["b"]
    assert registry.by_plugin("three") == []


def test_registries_do_not_share_state():
    first, second = CommandRegistry(), CommandRegistry()
    first.add(make("only_here"))
    assert second.get("only_here") is None
