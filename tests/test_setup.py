"""The README's set-up: what `make` does on a machine that lacks Apertium, and what `make test` shows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-apertium"


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run_script(folder: Path) -> subprocess.CompletedProcess:
    """The script with only `folder` and the shell's basics on PATH."""
    basics = folder / "basics"
    basics.mkdir(exist_ok=True)
    for tool in ("grep", "sh", "bash", "cat"):
        target = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if target and not (basics / tool).exists():
            (basics / tool).symlink_to(target)
    env = {**os.environ, "PATH": f"{folder}:{basics}"}
    return subprocess.run([str(basics / "bash"), str(SCRIPT)], capture_output=True, text=True, env=env, timeout=30)


def test_without_root_or_sudo_it_says_once_what_translate_needs_and_goes_on(tmp_path):
    stub(tmp_path, "apt-get", "echo apt-get was called >&2; exit 1")
    stub(tmp_path, "id", "echo 1000")  # not root, and no sudo on PATH
    result = run_script(tmp_path)
    assert result.returncode == 0
    assert result.stderr.count("note: /translate needs Apertium: sudo apt-get install apertium apertium-eng-spa") == 1
    assert "apt-get was called" not in result.stderr


def test_as_root_it_installs_apertium_with_apt_get(tmp_path):
    calls = tmp_path / "calls"
    stub(tmp_path, "apt-get", f'echo "$@" >> {calls}')
    stub(tmp_path, "id", "echo 0")
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq apertium apertium-eng-spa"]


def test_nothing_is_done_when_the_pair_is_installed(tmp_path):
    stub(tmp_path, "apertium", 'if [ "$1" = -l ]; then echo eng-spa; fi')
    stub(tmp_path, "apt-get", "echo apt-get was called >&2")
    result = run_script(tmp_path)
    assert result.returncode == 0 and result.stderr == ""


def test_make_test_lists_skipped_tests_with_their_reasons():
    dry_run = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    pytest_lines = [line for line in dry_run.stdout.splitlines() if "-m pytest" in line]
    assert len(pytest_lines) == 1 and " -ra" in pytest_lines[0], dry_run.stdout
