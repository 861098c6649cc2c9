"""`chatforge new-plugin`: the generated package installs, is found, and its own tests pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_new_plugin_writes_an_installable_package(cli, tmp_path):
    result = cli("new-plugin", "weather", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "weather"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "chatforge_weather/__init__.py", "pyproject.toml", "tests/test_weather.py"]
    pyproject = (folder / "pyproject.toml").read_text()
    assert '[project.entry-points.chatforge]\nweather = "chatforge_weather"' in pyproject
    assert f"pip install -e {folder}" in result.stdout


@pytest.mark.parametrize("name, problem", [("Hello World", "is not a usable plugin name"), ("9lives", "is not a usable")])
def test_new_plugin_refuses_bad_names(cli, tmp_path, name, problem):
    result = cli("new-plugin", name, "--dir", str(tmp_path))
    assert result.returncode == 2 and problem in result.stderr and list(tmp_path.iterdir()) == []


def test_new_plugin_never_overwrites(cli, tmp_path):
    (tmp_path / "hello").mkdir()
    result = cli("new-plugin", "hello", "--dir", str(tmp_path))
    assert result.returncode == 2 and "already exists" in result.stderr


def test_generated_plugin_installs_and_its_tests_pass(cli, tmp_path, tiny_gpt2):
    """pip install, then pytest on the package, then chatforge lists and answers it; no edits."""
    assert cli("new-plugin", "hello_kit", "--dir", str(tmp_path)).returncode == 0
    site = tmp_path / "site"
    # Installed beside the project's venv (--target), so the rest of the suite does not see it.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(tmp_path / "hello_kit")], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "hello_kit")],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "6 passed" in tests.stdout

    config = tmp_path / "config.yaml"
    config.write_text(f"generator:\n  model: {tiny_gpt2}\nmemory:\n  backend: memory\n"
                      f"plugins:\n  hello_kit:\n    greeting: Hi\n")
    env = {"PYTHONPATH": str(site)}
    listing = cli("plugins", "-c", str(config), env=env)
    assert "hello_kit  [entry point: chatforge-hello-kit 0.1.0 (chatforge_hello_kit)]" in listing.stdout
    chat = cli("chat", "-c", str(config), stdin="/hello_kit Ada\n", env=env)
    assert chat.stdout == "Hi, Ada!\n", chat.stderr
