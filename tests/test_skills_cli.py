"""The three skills through `chatforge chat` in pipe mode, as a user runs them (no network)."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from test_summarize import PARAGRAPH, SENTENCES  # noqa: E402


@pytest.fixture
def config(tmp_path, tiny_gpt2, model_cache):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        generator:
          model: {tiny_gpt2}
          temperature: 0
          max_new_tokens: 8
          cache_dir: {model_cache}
        memory:
          path: memory.sqlite3
    """))
    return path


def test_sentiment_summarize_and_help_in_pipe_mode(cli, config):
    lines = [
        "/sentiment I love this, it is wonderful!",
        "/sentiment This is the worst day of my life.",
        f"/summarize {PARAGRAPH}",
        "/help",
    ]
    result = cli("chat", "-c", str(config), stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("positive (+")
    assert out[1].startswith("negative (-")
    picked = [s.strip() + ("" if s.strip().endswith(".") else ".") for s in out[2].split(". ") if s.strip()]
    assert 2 <= len(picked) <= 3 and all(sentence in SENTENCES for sentence in picked)
    help_text = "\n".join(out[3:])
    assert "/sentiment TEXT - is a text positive, neutral or negative?" in help_text
    assert "/summarize [TEXT] - summarize a text, or this conversation" in help_text
    assert "/translate [SRC>]TGT TEXT - translate text into another language" in help_text


def test_summarize_the_conversation_after_a_few_turns(cli, config):
    lines = ["I am planning a trip to Japan in April.", "I would like to see the temples in Kyoto.",
             "My budget for Japan is two thousand dollars.", "/summarize"]
    result = cli("chat", "-c", str(config), stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("Our conversation so far, in short: ") and "Japan" in summary


@pytest.mark.skipif(shutil.which("apertium") is None, reason="apertium is not installed (CI installs it)")
def test_translate_in_pipe_mode(cli, config):
    result = cli("chat", "-c", str(config), stdin="/translate es Hello, how are you?\n/translate xx hello\n")
    assert result.returncode == 0, result.stderr
    spanish, refusal = result.stdout.strip().splitlines()
    assert "Hola" in spanish
    assert refusal.startswith("I can't translate into xx. Available pairs: ") and "eng→spa" in refusal
