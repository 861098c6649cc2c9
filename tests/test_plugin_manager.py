"""Finding plugins (built-in, entry points, config files and modules) and isolating their faults."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest

from chatforge.config import ConfigError, load_settings
from chatforge.plugin_manager import PluginError, PluginHost
from chatforge.testing import make_bot

GOOD_PLUGIN = '''
from chatforge import hookimpl, PluginConfig

class Config(PluginConfig):
    greeting: str = "hello"
    times: int = 1

@hookimpl
def chatforge_config_model():
    return Config

@hookimpl
def chatforge_register_commands(register, config):
    register("greet", lambda ctx: " ".join([config.greeting] * config.times), help="greet you")
'''


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def host_for(config: Path, strict: bool = False) -> tuple[PluginHost, list]:
    host = PluginHost(load_settings(config), strict=strict)
    return host, host.load()


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch):
    """A real distribution on sys.path, found by importlib.metadata through its entry point."""
    site = tmp_path / "site"
    (site / "cf_weather").mkdir(parents=True)
    (site / "cf_weather" / "__init__.py").write_text(GOOD_PLUGIN.replace('"greet"', '"weather"'))
    dist_info = site / "cf_weather-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cf-weather\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text("[chatforge]\nweather = cf_weather\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("cf_weather", None)


def test_builtins_are_registered_through_the_hooks(tmp_path):
    host, issues = host_for(write_config(tmp_path, "{}"))
    assert issues == []
    assert host.infos["core"].source == "builtin"
    assert host.infos["core"].hooks == ["chatforge_register_commands"]
    assert [c.name for c in host.commands.by_plugin("core")] == ["help", "history", "reset", "forget", "stats"]
    assert {"sentiment", "summarize", "translate"} <= {i.name for i in host.infos.values() if i.source == "builtin"}
    assert "console" in host.adapters


def test_entry_point_plugin_is_found_with_its_distribution(tmp_path, installed_distribution):
    host, issues = host_for(write_config(tmp_path, "plugins:\n  weather:\n    greeting: sun\n"))
    assert issues == []
    info = host.infos["weather"]
    assert (info.source, info.distribution, info.version) == ("entry point", "cf-weather", "1.2.3")
    assert info.commands == ["weather"]
    assert host.configs["weather"].greeting == "sun"


def test_plugin_from_a_py_file_listed_in_the_config(tmp_path):
    (tmp_path / "greeter.py").write_text(GOOD_PLUGIN)
    config = write_config(tmp_path, """
        plugins:
          greeter:
            module: ./greeter.py
            greeting: ahoy
            times: 2
    """)
    host, issues = host_for(config)
    assert issues == []
    assert host.infos["greeter"].source == "config"
    assert host.commands.get("greet").handler(None) == "ahoy ahoy"


def test_plugin_from_an_import_path_listed_in_the_config(tmp_path, monkeypatch):
    (tmp_path / "my_greeter.py").write_text(GOOD_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    host, issues = host_for(write_config(tmp_path, "plugins:\n  greeter:\n    module: my_greeter\n"))
    assert issues == [] and host.infos["greeter"].loaded
    sys.modules.pop("my_greeter", None)


def test_a_plugin_that_fails_to_import_is_reported_and_skipped(tmp_path, caplog):
    (tmp_path / "broken.py").write_text("import this_package_does_not_exist\n")
    config = write_config(tmp_path, "plugins:\n  broken:\n    module: broken.py\n")
    with caplog.at_level(logging.ERROR):
        host, issues = host_for(config)
    assert issues == []
    assert not host.infos["broken"].loaded
    assert host.infos["broken"].errors == [
        "import: needs the module 'this_package_does_not_exist', which is not installed "
        "(pip install the package that provides it, often: pip install this_package_does_not_exist)"]
    assert any("'broken'" in r.getMessage() and "import" in r.getMessage() for r in caplog.records)
    assert host.infos["core"].loaded  # everything else still works


def test_strict_mode_makes_a_plugin_failure_fatal(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('bad plugin')\n")
    config = write_config(tmp_path, "plugins:\n  broken:\n    module: broken.py\n")
    with pytest.raises(PluginError, match="broken.*bad plugin"):
        host_for(config, strict=True)


def test_a_missing_plugin_file_is_a_load_error(tmp_path):
    host, _ = host_for(write_config(tmp_path, "plugins:\n  ghost:\n    module: ./ghost.py\n"))
    assert "no such plugin file" in host.infos["ghost"].errors[0]


@pytest.mark.parametrize("module, problem", [
    ("chatforge.plugins.summarize", 'chatforge.plugins.summarize is already loaded as plugin "summarize" '
                                    "(set its options under plugins.summarize)"),
    ("/etc/passwd", "/etc/passwd is not a Python file (.py) nor an import path (package.module)"),
    ("./notes.txt", "./notes.txt is not a Python file (.py) nor an import path (package.module)"),
])
def test_a_module_that_cannot_be_a_plugin_is_a_config_issue_of_its_key(tmp_path, module, problem, caplog):
    (tmp_path / "notes.txt").write_text("not python\n")
    with caplog.at_level(logging.ERROR):
        host, issues = host_for(write_config(tmp_path, f"bot:\n  name: b\nplugins:\n  x:\n    module: {module}\n"))
    assert [(issue.path, issue.line, issue.message) for issue in issues] == [("plugins.x.module", 5, problem)]
    assert host.failures == [] and "x" not in host.infos and caplog.records == []
    assert host.infos["summarize"].loaded


def test_a_hook_name_that_does_not_exist_is_rejected(tmp_path):
    (tmp_path / "typo.py").write_text(
        "from chatforge import hookimpl\n@hookimpl\ndef chatforge_register_comands(register):\n    pass\n")
    host, _ = host_for(write_config(tmp_path, "plugins:\n  typo:\n    module: typo.py\n"))
    assert "registration" in host.infos["typo"].errors[0]
    assert "chatforge_register_comands" in host.infos["typo"].errors[0]


def test_a_disabled_plugin_is_not_imported(tmp_path):
    (tmp_path / "loud.py").write_text("raise RuntimeError('imported!')\n")
    host, issues = host_for(write_config(tmp_path, "plugins:\n  loud:\n    module: loud.py\n    enabled: false\n"))
    assert issues == []
    assert host.infos["loud"].enabled is False and host.infos["loud"].errors == []


def test_builtin_commands_can_be_disabled(tmp_path):
    host, _ = host_for(write_config(tmp_path, "plugins:\n  core:\n    enabled: false\n"))
    assert host.commands.get("help") is None


def test_plugin_config_errors_name_the_yaml_path_and_line(tmp_path):
    (tmp_path / "greeter.py").write_text(GOOD_PLUGIN)
    config = write_config(tmp_path, """
        plugins:
          greeter:
            module: greeter.py
            times: many
            colour: red
    """)
    host, issues = host_for(config)
    messages = [issue.format("config.yaml") for issue in issues]
    assert 'config.yaml:5: plugins.greeter.times: must be a valid integer, got "many"' in messages
    assert any(m.startswith("config.yaml:6: plugins.greeter.colour: unknown key") for m in messages)


def test_an_unknown_plugin_section_is_an_error(tmp_path):
    _, issues = host_for(write_config(tmp_path, "plugins:\n  nosuch:\n    enabled: true\n"))
    assert len(issues) == 1 and issues[0].path == "plugins.nosuch"
    assert 'no plugin named "nosuch"' in issues[0].message


def test_options_for_a_plugin_without_a_schema_are_errors(tmp_path):
    _, issues = host_for(write_config(tmp_path, "plugins:\n  core:\n    verbose: true\n"))
    assert [issue.path for issue in issues] == ["plugins.core.verbose"]


def test_adapter_sections_are_validated_by_the_adapter(tmp_path):
    _, issues = host_for(write_config(tmp_path, "adapters:\n  console:\n    stream: sometimes\n  irc:\n    enabled: true\n"))
    paths = sorted(issue.path for issue in issues)
    assert paths == ["adapters.console.stream", "adapters.irc"]


def test_two_plugins_cannot_claim_one_command_name(caplog):
    import types

    from chatforge import hookimpl

    @hookimpl
    def chatforge_register_commands(register):
        register("help", lambda ctx: "mine", help="steal help")

    with caplog.at_level(logging.ERROR):
        bot = make_bot(plugins={"thief": types.SimpleNamespace(chatforge_register_commands=chatforge_register_commands)},
                       strict=False)
    assert "already registered by plugin 'core'" in bot.engine.host.infos["thief"].errors[0]


def test_make_bot_rejects_bad_plugin_config():
    with pytest.raises(ConfigError, match="generator.max_new_tokens: must be a positive integer"):
        make_bot({"generator": {"max_new_tokens": 0}})


def fake_distribution(site: Path, name: str, module_source: str, requires: list[str] = ()) -> None:
    """An installed distribution (dist-info + module) with a `chatforge` entry point."""
    module = name.replace("-", "_")
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(module_source)
    dist_info = site / f"{module}-0.3.0.dist-info"
    dist_info.mkdir(parents=True)
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3.0\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    (dist_info / "METADATA").write_text(metadata)
    (dist_info / "entry_points.txt").write_text(f"[chatforge]\n{module} = {module}\n")


def test_a_missing_declared_dependency_is_named_with_its_install_command(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_distribution(site, "cf-needy", GOOD_PLUGIN, requires=["surely-not-installed-pkg>=1.0",
                                                             "pluggy>=1", "win-only; sys_platform == 'win32'",
                                                             "extra-only; extra == 'docs'"])
    monkeypatch.syspath_prepend(str(site))
    host, _ = host_for(write_config(tmp_path, "{}"))
    assert host.infos["cf_needy"].errors == [
        "import: needs surely-not-installed-pkg>=1.0, not installed or at another version: "
        "pip install 'surely-not-installed-pkg>=1.0'"]
    assert "cf_needy" not in sys.modules  # never imported


def test_plugins_command_lists_an_entry_point_that_raises_and_chat_still_runs(cli, tmp_path, tiny_gpt2):
    site = tmp_path / "site"
    fake_distribution(site, "cf-crashy", "raise RuntimeError('boom at import')\n")
    config = write_config(tmp_path, f"generator:\n  model: {tiny_gpt2}\nmemory:\n  backend: memory\n")
    env = {"PYTHONPATH": str(site)}
    listing = cli("plugins", "-c", str(config), env=env)
    assert listing.returncode == 0
    assert "cf_crashy  [entry point: cf-crashy 0.3.0 (cf_crashy)]" in listing.stdout
    assert "  error:    import: RuntimeError: boom at import (at cf_crashy.py:1)" in listing.stdout
    chat = cli("chat", "-c", str(config), stdin="/reset\n", env=env)
    assert chat.returncode == 0 and "nothing to forget" in chat.stdout
    assert "plugin 'cf_crashy' failed in import: RuntimeError: boom at import" in chat.stderr


def test_plugins_command_shows_the_installed_example_with_its_distribution(cli, tmp_path):
    pytest.importorskip("chatforge_dice", reason="make test installs examples/dice into .venv/test-plugins")
    listing = cli("plugins", "-c", str(write_config(tmp_path, "{}")))
    assert "dice  [entry point: chatforge-dice 0.1.0 (chatforge_dice)]" in listing.stdout
    assert "  commands: /roll, /rolls" in listing.stdout


def test_the_example_plugin_is_installed_for_the_tests_only(cli, tmp_path):
    """`make chat` uses the venv without the tests' plugin folder: a newcomer's bot has no /roll."""
    env = {"PYTHONPATH": ""}
    listing = cli("plugins", "-c", str(write_config(tmp_path, "{}")), env=env)
    assert listing.returncode == 0 and "core  [builtin" in listing.stdout
    assert "chatforge-dice" not in listing.stdout and "/roll" not in listing.stdout
