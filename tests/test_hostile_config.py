"""Config files written to hurt: secrets in error messages, YAML alias bombs, huge files, deep `${A:-` nesting,
and plugin paths that cannot be plugins. Each is checked through the real `chatforge` command, where the user
sees the message: exit status 2, one line naming the key, no traceback, no secret."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHATFORGE  # the installed command

SECRET = "999888777:SECRETxyzTOKENabc"
COMMANDS = [["config", "check"], ["run"]]


def write(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def assert_clean_refusal(result: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 2, the expected line among the output, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert any(line.endswith(expected) for line in result.stderr.splitlines()), result.stderr  # after the folder
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr


# ------------------------------------------------------------------ 6. secrets never appear in config errors

@pytest.mark.parametrize("yaml_text, expected", [
    ("generator:\n  max_new_tokens: ${CF_TOKEN}\n",
     "config.yaml:2: generator.max_new_tokens: must be a positive integer, "
     "got the value of ${CF_TOKEN} (from the environment)"),
    ("adapters:\n  telegram:\n    port: ${CF_TOKEN}\n",
     "config.yaml:3: adapters.telegram.port: must be a valid integer, "
     "got the value of ${CF_TOKEN} (from the environment)"),
    ("adapters:\n  discord:\n    respond_to: ${CF_TOKEN}\n",
     'config.yaml:3: adapters.discord.respond_to.0: must be "dm", "mention", "all" or a channel id (a long number), '
     "got the value of ${CF_TOKEN} (from the environment)"),
    ("adapters:\n  telegram:\n    port: 'port-${CF_TOKEN}-${CF_OTHER:-x}'\n",
     "config.yaml:3: adapters.telegram.port: must be a valid integer, "
     "got the values of ${CF_TOKEN} and ${CF_OTHER} (from the environment)"),
])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_value_from_the_environment_is_never_quoted_in_a_config_error(cli, tmp_path, yaml_text, expected, command):
    write(tmp_path, yaml_text)
    result = cli(*command, cwd=tmp_path, env={"CF_TOKEN": SECRET, "CF_OTHER": "other"}, timeout=120)
    assert_clean_refusal(result, expected)
    assert SECRET not in result.stdout + result.stderr and "SECRETxyz" not in result.stderr


def test_a_default_written_in_the_file_is_still_quoted(cli, tmp_path):
    """Only what came from the environment is hidden: a default from the file is shown as before."""
    write(tmp_path, "generator:\n  max_new_tokens: ${CF_UNSET_VARIABLE:-lots}\n")
    result = cli("config", "check", cwd=tmp_path, env={"CF_TOKEN": SECRET})
    assert_clean_refusal(result, 'config.yaml:2: generator.max_new_tokens: must be a positive integer, got "lots"')


# ------------------------------------------------------------------ 7. hostile YAML

def run_limited(args: list[str], cwd: Path, memory_bytes: int, timeout: float) -> subprocess.CompletedProcess:
    """`chatforge ARGS` with its address space capped, so that a blow-up fails the test instead of the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return subprocess.run([CHATFORGE, *args], cwd=cwd, capture_output=True, text=True, preexec_fn=limit,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{name}: &{name} [{','.join(['*' + previous] * 9)}]" for previous, name in zip("abcdefgh", "bcdefghi")]
) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once_in_bounded_memory(tmp_path):
    write(tmp_path, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600  # 9**9 strings once expanded
    start = time.monotonic()
    result = run_limited(["config", "check"], tmp_path, memory_bytes=1 << 30, timeout=30)
    assert time.monotonic() - start < 10  # mostly the interpreter's start
    assert_clean_refusal(result, "config.yaml:5: (top level): YAML aliases (*name) expand to more than 10000 "
                                 "values; a config file needs far fewer")


@pytest.mark.parametrize("text, expected", [
    ("a: &a [1, *a]\n", "config.yaml:1: (top level): YAML alias *a refers to itself"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "config.yaml:1: (top level): nested more than 100 levels deep"),
])
def test_a_recursive_alias_or_a_deep_nesting_is_one_line(cli, tmp_path, text, expected):
    write(tmp_path, text)
    assert_clean_refusal(cli("config", "check", cwd=tmp_path), expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_huge_config_file_is_refused_at_once_naming_its_size(cli, tmp_path, command):
    path = write(tmp_path, "bot:\n  name: x\n")
    with path.open("a") as file:
        file.write(("#" * 99 + "\n") * 500_000)  # 50 MB of comments
    start = time.monotonic()
    result = cli(*command, cwd=tmp_path, timeout=120)
    assert time.monotonic() - start < 15
    assert_clean_refusal(result, "config.yaml: (top level): config file is too large: 50.0 MB (at most 1 MB)")


def test_a_device_that_never_ends_is_refused_too(cli, tmp_path):
    result = cli("config", "check", "--config", "/dev/zero", cwd=tmp_path, timeout=60)
    assert_clean_refusal(result, "/dev/zero: (top level): config file is too large: more than 1 MB (at most 1 MB)")


# ------------------------------------------------------------------ 8. plugin paths in config

@pytest.mark.parametrize("module, expected", [
    ("chatforge.plugins.sentiment",
     'config.yaml:3: plugins.x.module: chatforge.plugins.sentiment is already loaded as plugin "sentiment" '
     "(set its options under plugins.sentiment)"),
    ("/etc/passwd", "config.yaml:3: plugins.x.module: /etc/passwd is not a Python file (.py) "
                    "nor an import path (package.module)"),
])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_plugin_module_that_cannot_be_a_plugin_is_one_line_naming_the_key(cli, tmp_path, module, expected,
                                                                            command):
    write(tmp_path, f"plugins:\n  x:\n    module: {module}\n")
    result = cli(*command, cwd=tmp_path, timeout=120)
    assert_clean_refusal(result, expected)
    assert [line[-len(expected):] for line in result.stderr.splitlines() if "plugins.x" in line] == [expected]
