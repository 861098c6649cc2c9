"""Tests for chatforge.config: finding, reading, substituting and validating the YAML config."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from chatforge.config import (
    CONFIG_ENV_VAR,
    ConfigError,
    ConfigIssue,
    Settings,
    StrictModel,
    find_config_file,
    load_settings,
    locate,
    validate_section,
)

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    return excinfo.value


def only_issue(error: ConfigError) -> ConfigIssue:
    assert len(error.issues) == 1, error.issues
    return error.issues[0]


# ------------------------------------------------------------------ defaults and valid files

def test_no_file_gives_defaults():
    settings = load_settings(None)
    assert settings.source is None
    assert settings.filename == "<defaults>"
    assert settings.generator.model == "gpt2"
    assert settings.generator.max_new_tokens == 96
    assert settings.memory.backend == "sqlite"
    assert settings.bot.command_prefix == "/"
    assert settings.plugins == {} and settings.adapters == {}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    settings = load_settings(write(tmp_path, text))
    assert settings.generator == Settings().generator
    assert settings.memory == Settings().memory
    assert settings.source == (tmp_path / "config.yaml").resolve()


def test_valid_file_is_read(tmp_path):
    path = write(tmp_path, """
generator:
  model: ./models/tiny
  fallback: false
  temperature: 0.2
  top_p: 0.5
  top_k: 0
  max_new_tokens: 12
  seed: 7
  stop: ["###", "END"]
memory:
  backend: memory
  scope: chat
  max_turns: 4
bot:
  name: robo
  command_prefix: "!"
logging:
  level: DEBUG
plugins:
  weather:
    units: metric
  core:
    enabled: false
adapters:
  console:
    enabled: true
    prompt: "> "
""")
    settings = load_settings(path)
    assert settings.generator.model == "./models/tiny"
    assert settings.generator.fallback is False
    assert settings.generator.temperature == 0.2
    assert settings.generator.top_p == 0.5
    assert settings.generator.top_k == 0
    assert settings.generator.max_new_tokens == 12
    assert settings.generator.seed == 7
    assert settings.generator.stop == ["###", "END"]
    assert settings.memory.backend == "memory"
    assert settings.memory.scope == "chat"
    assert settings.memory.max_turns == 4
    assert settings.bot.name == "robo"
    assert settings.bot.command_prefix == "!"
    assert settings.logging.level == "DEBUG"
    # Plugin and adapter sections keep their own keys for the plugin's schema.
    assert settings.plugins["weather"].enabled is True
    assert settings.plugins["weather"].model_extra == {"units": "metric"}
    assert settings.plugins["core"].enabled is False
    assert settings.adapters["console"].enabled is True
    assert settings.adapters["console"].model_extra == {"prompt": "> "}
    assert settings.source == path.resolve()
    assert settings.filename == str(path.resolve())
    assert settings.raw["plugins"]["weather"] == {"units": "metric"}
    assert settings.lines["generator.max_new_tokens"] == 8
    assert settings.lines["plugins.weather.units"] == 22


def test_adapters_are_off_unless_enabled(tmp_path):
    settings = load_settings(write(tmp_path, "adapters:\n  discord:\n    token: abc\n"))
    assert settings.adapters["discord"].enabled is False


def test_temperature_zero_is_accepted(tmp_path):
    settings = load_settings(write(tmp_path, "generator:\n  temperature: 0\n"))
    assert settings.generator.temperature == 0
    assert isinstance(settings.generator.temperature, float)


@pytest.mark.parametrize("value, expected", [("0.0", 0.0), ("1.5", 1.5), ("'0.25'", 0.25), ("2", 2.0)])
def test_temperature_accepts_numbers_and_numeric_strings(tmp_path, value, expected):
    settings = load_settings(write(tmp_path, f"generator:\n  temperature: {value}\n"))
    assert settings.generator.temperature == expected


def test_positive_int_accepts_a_numeric_string(tmp_path):
    settings = load_settings(write(tmp_path, "generator:\n  max_new_tokens: ' 12 '\n"))
    assert settings.generator.max_new_tokens == 12


# ------------------------------------------------------------------ error messages

def test_max_new_tokens_lots_names_path_and_line(tmp_path):
    error = load_error(tmp_path, "generator:\n  max_new_tokens: lots\n")
    issue = only_issue(error)
    assert issue.path == "generator.max_new_tokens"
    assert issue.line == 2
    path = str(tmp_path / "config.yaml")
    assert 'generator.max_new_tokens: must be a positive integer, got "lots"' in issue.format(path)
    assert issue.format(path) == f'{path}:2: generator.max_new_tokens: must be a positive integer, got "lots"'
    assert str(error) == issue.format(path)
    assert error.filename == path


def test_line_number_is_the_line_of_the_key(tmp_path):
    error = load_error(tmp_path, "# comment\n\nbot:\n  name: x\n\ngenerator:\n  model: m\n  max_new_tokens: lots\n")
    assert only_issue(error).line == 8


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-3", "-3"), ("true", "true"), ("1.5", "1.5"), ("[1]", "[1]")])
def test_max_new_tokens_must_be_positive_integer(tmp_path, value, shown):
    issue = only_issue(load_error(tmp_path, f"generator:\n  max_new_tokens: {value}\n"))
    assert issue.path == "generator.max_new_tokens"
    assert issue.message == f"must be a positive integer, got {shown}"


@pytest.mark.parametrize("value", ["-0.1", "warm", "true", ".nan", "[]"])
def test_temperature_must_be_non_negative_number(tmp_path, value):
    issue = only_issue(load_error(tmp_path, f"generator:\n  temperature: {value}\n"))
    assert issue.path == "generator.temperature"
    assert issue.message.startswith("must be a number of 0 or more")
    assert issue.line == 2


def test_unknown_nested_key_suggests_the_right_one(tmp_path):
    issue = only_issue(load_error(tmp_path, "generator:\n  model: gpt2\n  max_tokens: 5\n"))
    assert issue.path == "generator.max_tokens"
    assert issue.message == 'unknown key (did you mean "max_new_tokens"?)'
    assert issue.line == 3


def test_unknown_top_level_key_suggests_the_section(tmp_path):
    issue = only_issue(load_error(tmp_path, "genrator:\n  model: gpt2\n"))
    assert issue.path == "genrator"
    assert issue.message == 'unknown key (did you mean "generator"?)'
    assert issue.line == 1


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    issue = only_issue(load_error(tmp_path, "memory:\n  zzzzzz: 1\n"))
    assert issue.path == "memory.zzzzzz"
    assert issue.message.startswith("unknown key (known keys: ")
    for key in ("backend", "path", "scope", "max_turns", "max_tokens"):
        assert key in issue.message


@pytest.mark.parametrize("key", ["source", "raw", "lines", "env_references"])
def test_loader_internal_fields_cannot_be_set_from_yaml(tmp_path, key):
    issue = only_issue(load_error(tmp_path, f"{key}: {{}}\n"))
    assert issue.path == key
    assert issue.message.startswith("unknown key")
    assert issue.line == 1


def test_known_keys_do_not_list_loader_internal_fields(tmp_path):
    issue = only_issue(load_error(tmp_path, "qqqqqqq: 1\n"))
    assert "generator" in issue.message
    assert not re.search(r"\b(source|raw|lines)\b", issue.message)


@pytest.mark.parametrize(
    "text, path, message",
    [
        ("memory:\n  scope: everyone\n", "memory.scope", "must be 'user' or 'chat', got \"everyone\""),
        ("generator:\n  top_p: 2\n", "generator.top_p", "must be less than or equal to 1, got 2"),
        ("generator:\n  top_p: 0\n", "generator.top_p", "must be greater than 0, got 0"),
        ("generator:\n  top_k: -1\n", "generator.top_k", "must be greater than or equal to 0, got -1"),
        ("generator:\n  stop: END\n", "generator.stop", 'must be a valid list, got "END"'),
        ("bot:\n  command_prefix: ''\n", "bot.command_prefix", "must not be empty"),
        ("generator:\n  seed: abc\n", "generator.seed", "got \"abc\""),
        ("generator:\n  fallback: maybe\n", "generator.fallback", 'got "maybe"'),
        ("logging:\n  level: verbose\n", "logging.level", 'got "verbose"'),
        ("bot:\n  command_prefix: '!!!!'\n", "bot.command_prefix", 'got "!!!!"'),
        ("plugins:\n  core:\n    enabled: maybe\n", "plugins.core.enabled", 'got "maybe"'),
    ],
)
def test_wrong_values_name_path_and_value(tmp_path, text, path, message):
    issue = only_issue(load_error(tmp_path, text))
    assert issue.path == path
    assert message in issue.message
    assert issue.line == text.count("\n")  # the last line holds the bad value


@pytest.mark.parametrize("section", ["generator", "memory", "bot", "logging"])
def test_section_that_is_not_a_mapping(tmp_path, section):
    issue = only_issue(load_error(tmp_path, f"{section}: 5\n"))
    assert issue.path == section
    assert issue.message == "must be a mapping of keys to values, got 5"
    assert issue.line == 1


def test_plugins_must_be_a_mapping_of_sections(tmp_path):
    error = load_error(tmp_path, "plugins:\n  - core\n")
    assert any(issue.path.startswith("plugins") for issue in error.issues)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "generator:\n  max_new_tokens: lots\n  temprature: 1\nmemory:\n  scope: everyone\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    error = excinfo.value
    by_path = {issue.path: issue for issue in error.issues}
    assert set(by_path) == {"generator.max_new_tokens", "generator.temprature", "memory.scope"}
    assert by_path["generator.max_new_tokens"].line == 2
    assert by_path["generator.temprature"].line == 3
    assert 'did you mean "temperature"' in by_path["generator.temprature"].message
    assert by_path["memory.scope"].line == 5
    lines = str(error).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}:") for line in lines)


# ------------------------------------------------------------------ unreadable files

def test_invalid_yaml_reports_the_line(tmp_path):
    issue = only_issue(load_error(tmp_path, "generator:\n  model: gpt2\n   bad: indent\n"))
    assert issue.path == ""
    assert issue.message.startswith("not valid YAML: ")
    assert issue.line == 3
    assert issue.format("c.yaml").startswith("c.yaml:3: (top level): not valid YAML")


def test_unclosed_bracket_is_invalid_yaml(tmp_path):
    issue = only_issue(load_error(tmp_path, "generator:\n  stop: [a, b\nmemory: {}\n"))
    assert issue.message.startswith("not valid YAML")
    assert issue.line is not None and issue.line >= 2


@pytest.mark.parametrize("text, shown", [("- 1\n- 2\n", "[1, 2]"), ("just text\n", '"just text"'), ("42\n", "42")])
def test_top_level_must_be_a_mapping(tmp_path, text, shown):
    error = load_error(tmp_path, text)
    issue = only_issue(error)
    assert issue.path == ""
    assert issue.message == f"must be a mapping of sections, got {shown}"
    assert "(top level)" in str(error)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    issue = only_issue(excinfo.value)
    assert issue.message == "config file not found"
    assert str(path) in str(excinfo.value)


def test_directory_is_not_readable(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_settings(tmp_path)
    assert only_issue(excinfo.value).message.startswith("cannot read config file")


def test_non_utf8_file_is_not_readable(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("bot:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    assert only_issue(excinfo.value).message.startswith("cannot read config file")


# ------------------------------------------------------------------ environment variables

def test_env_variable_is_substituted(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_TEST_MODEL", "my/model")
    settings = load_settings(write(tmp_path, "generator:\n  model: ${CF_TEST_MODEL}\n"))
    assert settings.generator.model == "my/model"
    assert settings.raw["generator"]["model"] == "my/model"


def test_env_default_used_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_TEST_MODEL", raising=False)
    settings = load_settings(write(tmp_path, "generator:\n  model: ${CF_TEST_MODEL:-gpt2-medium}\n"))
    assert settings.generator.model == "gpt2-medium"


def test_env_value_wins_over_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_TEST_MODEL", "from-env")
    settings = load_settings(write(tmp_path, "generator:\n  model: ${CF_TEST_MODEL:-gpt2-medium}\n"))
    assert settings.generator.model == "from-env"


def test_env_default_used_when_set_but_empty(tmp_path, monkeypatch):
    """`${VAR:-default}` follows the shell: an empty value also takes the default."""
    monkeypatch.setenv("CF_TEST_MODEL", "")
    settings = load_settings(write(tmp_path, "generator:\n  model: ${CF_TEST_MODEL:-gpt2}\n"))
    assert settings.generator.model == "gpt2"


def test_env_set_but_empty_without_default_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_TEST_NAME", "")
    settings = load_settings(write(tmp_path, "bot:\n  name: 'bot${CF_TEST_NAME}'\n"))
    assert settings.bot.name == "bot"


def test_env_empty_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_TEST_NAME", raising=False)
    settings = load_settings(write(tmp_path, "bot:\n  name: 'x${CF_TEST_NAME:-}y'\n"))
    assert settings.bot.name == "xy"


def test_several_references_in_one_value_and_in_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_A", "alpha")
    monkeypatch.setenv("CF_B", "beta")
    monkeypatch.delenv("CF_C", raising=False)
    settings = load_settings(write(tmp_path, """
bot:
  name: "${CF_A}-${CF_B}-${CF_C:-gamma}"
generator:
  stop: ["${CF_A}", "literal", "${CF_C:-c}"]
plugins:
  weather:
    api_key: ${CF_B}
"""))
    assert settings.bot.name == "alpha-beta-gamma"
    assert settings.generator.stop == ["alpha", "literal", "c"]
    assert settings.plugins["weather"].model_extra == {"api_key": "beta"}


def test_env_values_are_validated_like_yaml_values(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_TOKENS", "64")
    monkeypatch.setenv("CF_TEMP", "0")
    settings = load_settings(write(tmp_path, "generator:\n  max_new_tokens: ${CF_TOKENS}\n  temperature: ${CF_TEMP}\n"))
    assert settings.generator.max_new_tokens == 64
    assert settings.generator.temperature == 0.0

    monkeypatch.setenv("CF_TOKENS", "lots")
    issue = only_issue(load_error(tmp_path, "generator:\n  max_new_tokens: ${CF_TOKENS}\n"))
    assert issue.format("c.yaml") == ('c.yaml:2: generator.max_new_tokens: must be a positive integer, '
                                      'got the value of ${CF_TOKENS} (from the environment)')


@pytest.mark.parametrize("text, environment, expected", [
    ("${CF_A:-${CF_B}}", {"CF_B": "bee"}, "bee"),
    ("${CF_A:-${CF_B}}", {"CF_A": "ay", "CF_B": "bee"}, "ay"),
    ("${CF_A:-${CF_B:-x}-${CF_C:-y}}!", {"CF_C": "sea"}, "x-sea!"),
    ("${CF_A:-{braces}}}", {}, "{braces}}"),  # the first "}" closes, as before
    ("${CF_A:-" * 3 + "deep" + "}" * 3, {}, "deep"),
])
def test_nested_defaults_resolve_as_in_the_shell(tmp_path, monkeypatch, text, environment, expected):
    for name in ("CF_A", "CF_B", "CF_C"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert load_settings(write(tmp_path, f"bot:\n  name: '{text}'\n")).bot.name == expected


def test_a_default_that_is_not_needed_does_not_need_its_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_A", "ay")
    monkeypatch.delenv("CF_B", raising=False)
    assert load_settings(write(tmp_path, "bot:\n  name: ${CF_A:-${CF_B}}\n")).bot.name == "ay"
    monkeypatch.delenv("CF_A")
    issue = only_issue(load_error(tmp_path, "bot:\n  name: ${CF_A:-${CF_B}}\n"))
    assert issue.format("c.yaml") == "c.yaml:2: bot.name: environment variable CF_B is not set"


def test_an_unclosed_default_is_an_error_naming_the_key_and_line(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_A", raising=False)
    issue = only_issue(load_error(tmp_path, "bot:\n  command_prefix: '!'\n  name: 'x${CF_A:-y'\n"))
    assert issue.format("c.yaml") == 'c.yaml:3: bot.name: "${CF_A:-" has no closing "}"'


@pytest.mark.parametrize("closed", [True, False])
def test_ten_thousand_nested_defaults_take_linear_time(tmp_path, monkeypatch, closed):
    monkeypatch.delenv("a", raising=False)
    text = "bot:\n  name: '" + "${a:-" * 10_000 + ("x" + "}" * 10_000 if closed else "") + "'\n"
    start = time.perf_counter()
    if closed:
        assert load_settings(write(tmp_path, text)).bot.name == "x"
    else:
        assert only_issue(load_error(tmp_path, text)).message == '"${a:-" has no closing "}"'
    assert time.perf_counter() - start < 1.0  # was 18.7 s for the unclosed one: every "${" scanned to the end


def test_a_validator_that_quotes_a_value_from_the_environment_does_not_leak_it(tmp_path, monkeypatch):
    from pydantic import field_validator

    class Schema(StrictModel):
        colour: str = "red"

        @field_validator("colour")
        @classmethod
        def _known(cls, value: str) -> str:
            raise ValueError(f"a colour name, not {value!r} ({value})")

    monkeypatch.setenv("CF_COLOUR", "hunter2-secret")
    settings = load_settings(write(tmp_path, "plugins:\n  p:\n    colour: ${CF_COLOUR}\n"))
    _, [issue] = validate_section(Schema, settings.plugins["p"].model_extra, "plugins.p", settings)
    assert issue.format("c.yaml") == ("c.yaml:3: plugins.p.colour: must be a colour name, not '${CF_COLOUR}' "
                                      "(${CF_COLOUR}), got the value of ${CF_COLOUR} (from the environment)")


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path):
    settings = load_settings(write(tmp_path, """\
generator:
  stop: &stops [a, b]
limits: &limits
  rate_burst: 3
  max_pending: 9
plugins:
  p:
    words: *stops
    limits:
      <<: *limits
      rate_burst: 4
"""))
    assert settings.generator.stop == ["a", "b"] and settings.limits.max_pending == 9
    assert settings.plugins["p"].model_extra == {"words": ["a", "b"], "limits": {"rate_burst": 4, "max_pending": 9}}


def test_non_string_values_are_left_alone(tmp_path):
    settings = load_settings(write(tmp_path, "generator:\n  top_k: 5\n  fallback: false\n  seed: null\n"))
    assert settings.generator.top_k == 5
    assert settings.generator.fallback is False
    assert settings.generator.seed is None


def test_dollar_without_braces_is_literal(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME_PRICE", "x")
    settings = load_settings(write(tmp_path, "bot:\n  name: 'costs $HOME_PRICE and ${not valid}'\n"))
    assert settings.bot.name == "costs $HOME_PRICE and ${not valid}"


def test_unset_env_variable_names_yaml_path_and_line(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_TEST_SECRET", raising=False)
    error = load_error(tmp_path, "bot:\n  name: x\nadapters:\n  discord:\n    token: ${CF_TEST_SECRET}\n")
    issue = only_issue(error)
    assert issue.path == "adapters.discord.token"
    assert issue.message == "environment variable CF_TEST_SECRET is not set"
    assert issue.line == 5
    assert "adapters.discord.token: environment variable CF_TEST_SECRET is not set" in str(error)


def test_unset_env_variable_in_a_list_names_the_item(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_TEST_STOP", raising=False)
    issue = only_issue(load_error(tmp_path, "generator:\n  stop:\n    - a\n    - ${CF_TEST_STOP}\n"))
    assert issue.path == "generator.stop.1"
    assert issue.line == 4


def test_unset_env_variable_is_reported_with_other_issues(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_TEST_MODEL", raising=False)
    error = load_error(tmp_path, "generator:\n  model: ${CF_TEST_MODEL}\nmemory:\n  scope: everyone\n")
    assert {issue.path for issue in error.issues} == {"generator.model", "memory.scope"}


# ------------------------------------------------------------------ finding the file

def test_find_explicit_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "{}\n")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "from-env.yaml"))
    assert find_config_file(str(tmp_path / "explicit.yaml")) == tmp_path / "explicit.yaml"


def test_find_env_var_beats_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "{}\n")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "other" / "from-env.yaml"))
    assert find_config_file(None) == tmp_path / "other" / "from-env.yaml"


def test_find_config_in_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    write(tmp_path, "bot:\n  name: here\n")
    found = find_config_file(None)
    assert found is not None
    assert found.resolve() == (tmp_path / "config.yaml").resolve()
    assert load_settings(found).bot.name == "here"


def test_find_nothing_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert find_config_file(None) is None


def test_find_ignores_a_folder_named_config_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    (tmp_path / "config.yaml").mkdir()
    assert find_config_file(None) is None


def test_find_empty_env_var_is_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONFIG_ENV_VAR, "")
    assert find_config_file(None) is None


def test_find_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert find_config_file("~/bots/config.yaml") == tmp_path / "bots" / "config.yaml"
    monkeypatch.setenv(CONFIG_ENV_VAR, "~/env.yaml")
    assert find_config_file(None) == tmp_path / "env.yaml"


def test_find_returns_explicit_path_even_if_missing_and_loading_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    found = find_config_file(str(tmp_path / "missing.yaml"))
    assert found == tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(found)


# ------------------------------------------------------------------ resolve_path

def test_resolve_relative_path_against_config_folder(tmp_path, monkeypatch):
    config = write(tmp_path, "memory:\n  path: data/memory.sqlite3\n", name="conf/bot.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config)
    resolved = settings.resolve_path(settings.memory.path)
    assert resolved == (tmp_path / "conf").resolve() / "data" / "memory.sqlite3"
    assert resolved.is_absolute()


def test_resolve_when_config_was_given_relative(tmp_path, monkeypatch):
    write(tmp_path, "memory:\n  path: m.sqlite3\n", name="sub/c.yaml")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("sub/c.yaml"))
    assert settings.source == (tmp_path / "sub" / "c.yaml").resolve()
    # Changing folder afterwards does not change where the path points.
    monkeypatch.chdir(tmp_path.parent)
    assert settings.resolve_path("m.sqlite3") == (tmp_path / "sub").resolve() / "m.sqlite3"


def test_resolve_absolute_path_unchanged(tmp_path):
    settings = load_settings(write(tmp_path, "{}\n"))
    absolute = tmp_path / "abs" / "file.db"
    assert settings.resolve_path(str(absolute)) == absolute


def test_resolve_expands_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    settings = load_settings(write(tmp_path, "{}\n"))
    assert settings.resolve_path("~/x/y.db") == home / "x" / "y.db"


def test_resolve_without_config_file_stays_relative():
    settings = load_settings(None)
    assert settings.resolve_path("data/x.db") == Path("data/x.db")


# ------------------------------------------------------------------ validate_section

class Location(StrictModel):
    city: str
    country: str = "FR"


class WeatherConfig(StrictModel):
    units: Literal["metric", "imperial"] = "metric"
    refresh_minutes: int = Field(default=10, gt=0)
    api_key: Optional[str] = None
    home: Location = Location(city="Lyon")


WEATHER_YAML = """\
plugins:
  weather:
    units: kelvin
    refresh_minuts: 5
    home:
      ctiy: Paris
"""


def weather_settings(tmp_path) -> Settings:
    return load_settings(write(tmp_path, WEATHER_YAML))


def test_validate_section_valid(tmp_path):
    settings = load_settings(write(tmp_path, "plugins:\n  weather:\n    units: imperial\n"))
    data = settings.plugins["weather"].model_extra
    model, issues = validate_section(WeatherConfig, data, "plugins.weather", settings)
    assert issues == []
    assert isinstance(model, WeatherConfig)
    assert model.units == "imperial"
    assert model.refresh_minutes == 10


def test_validate_section_reports_issues_with_paths_and_lines(tmp_path):
    settings = weather_settings(tmp_path)
    data = settings.plugins["weather"].model_extra
    model, issues = validate_section(WeatherConfig, data, "plugins.weather", settings)
    assert model is None
    by_path = {issue.path: issue for issue in issues}
    assert set(by_path) == {
        "plugins.weather.units",
        "plugins.weather.refresh_minuts",
        "plugins.weather.home.ctiy",
        "plugins.weather.home.city",
    }
    assert by_path["plugins.weather.units"].message == "must be 'metric' or 'imperial', got \"kelvin\""
    assert by_path["plugins.weather.units"].line == 3
    assert by_path["plugins.weather.refresh_minuts"].message == 'unknown key (did you mean "refresh_minutes"?)'
    assert by_path["plugins.weather.refresh_minuts"].line == 4
    # The suggestion looks into nested models too.
    assert by_path["plugins.weather.home.ctiy"].message == 'unknown key (did you mean "city"?)'
    assert by_path["plugins.weather.home.ctiy"].line == 6
    # A missing key has no line of its own: it gets its parent's line.
    assert by_path["plugins.weather.home.city"].message == "is required"
    assert by_path["plugins.weather.home.city"].line == 5
    text = by_path["plugins.weather.units"].format(settings.filename)
    assert text == f"{settings.filename}:3: plugins.weather.units: must be 'metric' or 'imperial', got \"kelvin\""


def test_validate_section_with_plain_pydantic_model(tmp_path):
    class Plain(BaseModel):
        count: int

    settings = load_settings(write(tmp_path, "adapters:\n  chat:\n    count: many\n"))
    model, issues = validate_section(Plain, settings.adapters["chat"].model_extra, "adapters.chat", settings)
    assert model is None
    [issue] = issues
    assert issue.path == "adapters.chat.count"
    assert issue.line == 3
    assert issue.message.startswith("must be a valid integer")
    assert issue.message.endswith('got "many"')


def test_validate_section_without_file_has_no_lines():
    settings = load_settings(None)
    model, issues = validate_section(WeatherConfig, {"units": "x"}, "plugins.weather", settings)
    assert model is None
    assert [(issue.path, issue.line) for issue in issues] == [("plugins.weather.units", None)]


# ------------------------------------------------------------------ issue formatting and location

def test_issue_format_variants():
    assert ConfigIssue("a.b", "bad", 3).format("c.yaml") == "c.yaml:3: a.b: bad"
    assert ConfigIssue("a.b", "bad").format("c.yaml") == "c.yaml: a.b: bad"
    assert ConfigIssue("a.b", "bad", 3).format() == "a.b: bad"
    assert ConfigIssue("", "bad").format("c.yaml") == "c.yaml: (top level): bad"


def test_config_error_lists_every_issue():
    error = ConfigError([ConfigIssue("a", "one", 1), ConfigIssue("b.c", "two")], "f.yaml")
    assert str(error) == "f.yaml:1: a: one\nf.yaml: b.c: two"
    assert error.filename == "f.yaml"
    assert len(error.issues) == 2


def test_locate_uses_nearest_parent_line():
    lines = {"a": 1, "a.b": 2}
    located = locate([ConfigIssue("a.b.c.d", "x"), ConfigIssue("a.z", "y"), ConfigIssue("q", "z"),
                      ConfigIssue("a.b", "w", 9)], lines)
    assert [issue.line for issue in located] == [2, 1, None, 9]


# ------------------------------------------------------------------ the shipped config

def test_shipped_config_loads_with_env_unset(monkeypatch):
    assert SHIPPED_CONFIG.is_file()
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    for name in names:
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(SHIPPED_CONFIG)
    assert settings.source == SHIPPED_CONFIG
    assert settings.generator.model == "gpt2"
    assert settings.generator.temperature == 0.7
    assert settings.bot.command_prefix == "/"
    assert settings.plugins["core"].enabled is True
    assert settings.adapters["console"].enabled is True
    # Every documented default in the file matches the code's default.
    assert settings.generator == Settings().generator
    assert settings.bot == Settings().bot
    assert settings.logging == Settings().logging


# ------------------------------------------------------------------ plain words

@pytest.mark.parametrize("text, message", [
    ("bot:\n  command_prefix: ''\n", "must not be empty"),
    ("bot:\n  command_prefix: '!!!!'\n", 'must be at most 3 characters long, got "!!!!"'),
    ("generator:\n  fallback: maybe\n", 'must be true or false, got "maybe"'),
    ("generator:\n  top_k: 1.5\n", "must be a valid integer, got 1.5"),
    ("generator: [1, 2]\n", "must be a mapping of keys to values, got [1, 2]"),
    ("plugins:\n  core:\n    enabled: maybe\n", 'must be true or false, got "maybe"'),
])
def test_pydantic_messages_are_put_in_plain_words(tmp_path, text, message):
    issue = only_issue(load_error(tmp_path, text))
    assert issue.message == message
    assert not re.search(r"Input should|String should|unable to|instance of|fractional", issue.message)


def test_plain_words_cover_plugin_schemas_too(tmp_path):
    class Schema(StrictModel):
        name: str = Field("xy", min_length=2)
        tags: list[str] = Field(["a"], min_length=1, max_length=2)

    settings = load_settings(write(tmp_path, "plugins:\n  p:\n    name: a\n    tags: []\n"))
    _, issues = validate_section(Schema, settings.plugins["p"].model_extra, "plugins.p", settings)
    assert [(i.path, i.message) for i in issues] == [
        ("plugins.p.name", 'must be at least 2 characters long, got "a"'),
        ("plugins.p.tags", "must not be empty"),
    ]
    _, issues = validate_section(Schema, {"tags": ["a", "b", "c"]}, "plugins.p", settings)
    assert [i.message for i in issues] == ['must have at most 2 items, got ["a", "b", "c"]']


def test_a_validator_message_that_shows_the_value_does_not_get_it_twice(tmp_path):
    from pydantic import field_validator

    class Schema(StrictModel):
        colour: str = "red"

        @field_validator("colour")
        @classmethod
        def _known(cls, value: str) -> str:
            raise ValueError(f"a colour name, not {value!r}")

    settings = load_settings(None)
    _, [issue] = validate_section(Schema, {"colour": "everyone"}, "plugins.p", settings)
    assert issue.message == "must be a colour name, not 'everyone'"


def test_discord_respond_to_names_the_wrong_item_once(tmp_path):
    from chatforge.adapters.discord import DiscordConfig

    settings = load_settings(write(tmp_path, "adapters:\n  discord:\n    respond_to: [dm, everyone]\n"))
    _, [issue] = validate_section(DiscordConfig, settings.adapters["discord"].model_extra, "adapters.discord",
                                  settings)
    assert issue.format("c.yaml") == ('c.yaml:3: adapters.discord.respond_to.1: must be "dm", "mention", "all" '
                                      'or a channel id (a long number), got "everyone"')
    assert DiscordConfig(respond_to="DM").respond_to == ["dm"]  # one value needs no list
    _, [issue] = validate_section(DiscordConfig, {"respond_to": []}, "adapters.discord", settings)
    assert issue.message == "must not be empty"


# ------------------------------------------------------------------ one pass

def test_issues_are_sorted_by_line_unlocated_ones_last():
    error = ConfigError([ConfigIssue("c", "three", 9), ConfigIssue("", "top"), ConfigIssue("b", "two", 2),
                         ConfigIssue("a", "one", 2)], "f.yaml")
    assert [issue.path for issue in error.issues] == ["b", "a", "c", ""]
    assert str(error).splitlines()[0] == "f.yaml:2: b: two"


def test_a_config_error_keeps_the_settings_it_could_build_for_checking_the_rest(tmp_path):
    error = load_error(tmp_path, """\
generator:
  model: tiny
  max_new_tokens: lots
  dtype: float16
memory:
  scpoe: chat
  max_turns: 4
bot: 7
plugins:
  core:
    enabled: maybe
  sentiment:
    mode: loud
adapters:
  discord:
    enabled: true
    respond_to: [everyone]
""")
    assert {issue.path for issue in error.issues} == {
        "generator.max_new_tokens", "generator.dtype", "memory.scpoe", "bot", "plugins.core.enabled"}
    settings = error.settings
    assert settings is not None and settings.filename == str((tmp_path / "config.yaml").resolve())
    # What was wrong is left at its default; everything else is kept, so the plugins can be checked.
    assert settings.generator.model == "tiny" and settings.generator.max_new_tokens == 96
    assert settings.generator.dtype == "float32" and settings.memory.max_turns == 4
    assert settings.bot == Settings().bot and settings.plugins["core"].enabled is True
    assert settings.plugins["sentiment"].model_extra == {"mode": "loud"}
    assert settings.adapters["discord"].enabled is True
    assert settings.lines["adapters.discord.respond_to"] == 17


def test_two_wrong_items_of_a_list_leave_the_rest_of_the_section_alone(tmp_path):
    error = load_error(tmp_path, "memory:\n  max_turns: 4\n  redact: [mail, fone]\n")
    assert [issue.path for issue in error.issues] == ["memory.redact.0", "memory.redact.1"]
    assert error.settings.memory.max_turns == 4 and error.settings.memory.redact == []


def test_settings_remember_which_environment_variables_a_value_came_from(tmp_path, monkeypatch):
    monkeypatch.delenv("CF_TEST_TOKEN", raising=False)
    monkeypatch.setenv("CF_TEST_HOST", "h")
    settings = load_settings(write(tmp_path, "adapters:\n  telegram:\n    token: ${CF_TEST_TOKEN:-}\n"
                                             "    base_url: http://${CF_TEST_HOST}:${CF_TEST_PORT:-80}/bot\n"))
    assert settings.env_references["adapters.telegram.token"] == ["CF_TEST_TOKEN"]
    assert settings.env_references["adapters.telegram.base_url"] == ["CF_TEST_HOST", "CF_TEST_PORT"]
