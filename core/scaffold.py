"""`chatforge new-plugin NAME`: a ready-to-install plugin package whose tests pass as generated."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from . import __version__

PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

FILES: dict[str, str] = {
    "pyproject.toml": '''\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "chatforge-$dist"
version = "0.1.0"
description = "A chatforge plugin: /$name"
readme = "README.md"
requires-python = ">=3.10"
# Every Python package the plugin imports belongs here: chatforge checks them
# before loading the plugin and names any that is missing, with its install command.
dependencies = ["chatforge>=$chatforge_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This is how chatforge finds the plugin once it is installed.
[project.entry-points.chatforge]
$name = "$module"

[tool.setuptools]
packages = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''',
    "$module/__init__.py": '''\
"""$name: a chatforge plugin.

    /$name [NAME]   ->  Hello, NAME!
    hello $name     ->  answered without a command, by the free-text handler
"""

from __future__ import annotations

from chatforge import CommandContext, Message, PluginConfig, hookimpl


class Config(PluginConfig):
    """Options under `plugins.$name` in chatforge's config.yaml; unknown keys are errors."""

    greeting: str = "Hello"


@hookimpl
def chatforge_config_model():
    return Config


def greet(ctx: CommandContext) -> str:
    who = ctx.args or ctx.message.display_name or "there"
    return f"{ctx.config.greeting}, {who}!"


@hookimpl
def chatforge_register_commands(register):
    register("$name", greet, help="say hello", usage="[NAME]")


@hookimpl
def chatforge_handle_text(message: Message, config: Config):
    """Claim messages that greet this plugin; None lets other plugins or the model answer."""
    if message.text.lower().strip(" !.") == "hello $name":
        return f"{config.greeting} from $name!"
    return None
''',
    "tests/test_$name.py": '''\
"""Tests with chatforge's test kit: the chatforge_bot fixture talks to a bot with this plugin installed."""


def test_command(chatforge_bot):
    assert chatforge_bot.ask("/$name Ada") == "Hello, Ada!"


def test_command_without_a_name_greets_the_sender(chatforge_bot):
    assert chatforge_bot.ask("/$name", display_name="Grace") == "Hello, Grace!"


def test_free_text_handler(chatforge_bot):
    assert chatforge_bot.ask("Hello $name!") == "Hello from $name!"


def test_other_text_goes_to_the_language_model(chatforge_bot):
    assert chatforge_bot.ask("what time is it?") == "echo: what time is it?"


def test_config_option(make_chatforge_bot):
    bot = make_chatforge_bot({"plugins": {"$name": {"greeting": "Ahoy"}}})
    assert bot.ask("/$name Ada") == "Ahoy, Ada!"


def test_listed_in_help(chatforge_bot):
    assert "/$name [NAME] - say hello" in chatforge_bot.ask("/help")
''',
    "README.md": '''\
# chatforge-$dist

A [chatforge](https://pypi.org/project/chatforge/) plugin that adds `/$name`.

## Install and try it

```sh
pip install -e .            # chatforge finds it through its entry point
chatforge plugins           # lists "$name" with its commands
chatforge chat              # then type: /$name Ada
```

## Configure it

```yaml
plugins:
  $name:
    greeting: Ahoy          # default: Hello
    # enabled: false        # turns it off
```

## Test it

```sh
pip install -e '.[test]'
pytest
```
''',
}


class ScaffoldError(Exception):
    """A name or folder that cannot be used; the message says why."""


def create_plugin(name: str, parent: Path) -> Path:
    """Write the package for plugin `name` into `parent/name`; returns that folder."""
    name = name.strip().lower().replace("-", "_")
    if not PLUGIN_NAME.match(name):
        raise ScaffoldError(f"{name!r} is not a usable plugin name: use 1-32 lowercase letters, digits "
                            f"or _ (starting with a letter); it is also the command's name")
    target = parent / name
    if target.exists():
        raise ScaffoldError(f"{target} already exists; choose another name or --dir")
    values = {"name": name, "dist": name.replace("_", "-"), "module": f"chatforge_{name}",
              "chatforge_version": __version__}
    for relative, text in FILES.items():
        path = target / Template(relative).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values), encoding="utf-8")
    return target
