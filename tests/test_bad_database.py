"""A bad memory file is one clear line and exit status 2; damaged pages are a warning, not lost turns.

Each case runs the real `chatforge chat` on a config whose `memory.path`
names the bad file. A full disk is real where the machine allows it: a
filled 64 KiB tmpfs mounted in a user namespace (`unshare -rm`); a file-size
limit (RLIMIT_FSIZE) gives the disk I/O error of a quota everywhere.
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatforge.memory import Turn, conversation_key
from chatforge.sqlite_memory import MIGRATIONS, SQLiteMemory
from chatforge.message import Message

CHATFORGE = str(Path(sys.executable).parent / "chatforge")


@pytest.fixture
def config_for(tmp_path, tiny_gpt2, model_cache):
    """A config file whose memory.path is `path`."""
    def write(path: Path) -> Path:
        config = tmp_path / "config.yaml"
        config.write_text(textwrap.dedent(f"""
            generator:
              model: {tiny_gpt2}
              max_new_tokens: 4
              cache_dir: {model_cache}
            memory:
              path: {path}
        """))
        return config
    return write


def filled_database(path: Path, key: str = "k", turns: int = 300) -> bytes:
    """A memory file with `turns` long exchanges in conversation `key` (many pages); its bytes."""
    memory = SQLiteMemory(path)
    for i in range(turns):
        memory.add(key, Turn("user", f"line {i}: " + "x" * 400, 1000.0 + i, "u"),
                   Turn("assistant", f"reply {i}", 1000.0 + i))
    memory.close()
    return path.read_bytes()


def newer_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()


BAD_FILES = {
    "random bytes": (lambda path: path.write_bytes(os.urandom(8192)), "is not an SQLite database"),
    "truncated": (lambda path: path.write_bytes(filled_database(path)[:20_000]), "is truncated (20000 of "),
    "a directory": (lambda path: path.mkdir(), "is a folder, not a file"),
    "newer schema": (newer_schema, f"was written by a newer chatforge (schema {len(MIGRATIONS) + 1} > "),
}


def assert_one_clear_line(result, path: Path, problem: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"chatforge: memory.path: {path}: {problem}"), lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_memory_file_is_one_line_and_exit_2(cli, tmp_path, config_for, case):
    make, problem = BAD_FILES[case]
    path = tmp_path / "memory.sqlite3"
    make(path)
    result = cli("chat", "-c", str(config_for(path)), stdin="hello\n")
    assert_one_clear_line(result, path, problem)


def test_chatforge_run_says_the_same(cli, tmp_path, config_for):
    path = tmp_path / "memory.sqlite3"
    path.write_bytes(b"not a database at all\n" * 100)
    result = cli("run", "--adapter", "console", "-c", str(config_for(path)), stdin="hello\n")
    assert_one_clear_line(result, path, "is not an SQLite database")
    assert "move it aside or point memory.path at another file" in result.stderr


@pytest.mark.parametrize("case", ["random bytes", "newer schema"])
def test_config_check_reads_an_existing_memory_file_too(cli, tmp_path, config_for, case):
    make, problem = BAD_FILES[case]
    path = tmp_path / "memory.sqlite3"
    make(path)
    result = cli("config", "check", "-c", str(config_for(path)))
    assert_one_clear_line(result, path, problem)
    assert "OK" not in result.stdout


def test_config_check_creates_no_memory_file(cli, tmp_path, config_for):
    path = tmp_path / "data" / "memory.sqlite3"
    result = cli("config", "check", "-c", str(config_for(path)))
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stderr
    assert not path.parent.exists()


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not unshare_works(), reason="no user namespaces here (unshare -rm), so no private tmpfs")
def test_a_full_disk_at_start(tmp_path, config_for):
    disk = tmp_path / "disk"
    disk.mkdir()
    path = disk / "memory.sqlite3"
    config = config_for(path)
    script = (f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(disk))} && "
              f"(head -c 1000000 /dev/zero > {shlex.quote(str(disk / 'filler'))} 2>/dev/null; "
              f"exec {shlex.quote(CHATFORGE)} chat -c {shlex.quote(str(config))})")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], input="hello\n", capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_clear_line(result, path, "cannot be written: the disk is full")
    assert "free some space" in result.stderr


def test_a_file_size_limit_at_start(tmp_path, config_for):
    path = tmp_path / "memory.sqlite3"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # noqa: E731
    result = subprocess.run([CHATFORGE, "chat", "-c", str(config_for(path))], input="hello\n",
                            capture_output=True, text=True, timeout=300, preexec_fn=limit,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_clear_line(result, path, "cannot be written (disk I/O error)")


def damage_an_old_page(path: Path, key: str = "k") -> None:
    """Mark the page holding the oldest turns as an index page: quick_check notices, the newest still read."""
    data = bytearray(filled_database(path, key))
    page_size = int.from_bytes(data[16:18], "big")
    page = data.index(b"line 5: ") // page_size
    assert page > 1
    data[page * page_size] = 0x0A
    path.write_bytes(bytes(data))


def test_damaged_pages_are_a_warning_and_the_rest_is_served(tmp_path, caplog):
    path = tmp_path / "memory.sqlite3"
    damage_an_old_page(path)
    with caplog.at_level(logging.WARNING, logger="chatforge.memory"):
        memory = SQLiteMemory(path)
    try:
        [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert str(path) in warning.getMessage() and ".recover" in warning.getMessage()
        assert [t.text for t in memory.recent("k", 2)] == ["line 299: " + "x" * 400, "reply 299"]
        memory.add("k", Turn("user", "still writable", 2000.0, "u"))
        assert memory.recent("k", 1)[0].text == "still writable"
    finally:
        memory.close()


def test_damaged_pages_are_one_warning_line_through_the_cli(cli, tmp_path, config_for):
    path = tmp_path / "memory.sqlite3"
    damage_an_old_page(path, conversation_key(Message("", platform="console", chat="console", user="tester")))
    result = cli("chat", "--user", "tester", "-c", str(config_for(path)), stdin="/history\n")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and str(path) in warnings[0], result.stderr
    assert "line 299" in result.stdout
