"""`chatforge finetune` as a user runs it: a JSONL file in, an adapter out, served by `chatforge chat`."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

TOPICS = ["the weather", "my cat", "dinner", "the news", "music", "work", "the garden", "football",
          "books", "the sea", "coffee", "trains", "the city", "games", "birds", "tea"]


def write_config(tmp_path: Path, tiny_gpt2: Path, model_cache: Path, adapter: Path | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        generator:
          model: {tiny_gpt2}
          temperature: 0
          max_new_tokens: 6
          cache_dir: {model_cache}
    """) + (f"  adapter: {adapter}\n" if adapter else "") + "memory:\n  path: memory.sqlite3\n")
    return path


@pytest.fixture(scope="module")
def learnable_gpt2(tiny_gpt2, tmp_path_factory) -> Path:
    """The tiny GPT-2 with its (tied) embeddings scaled up: at the random init's 0.02 scale its logits are
    nearly flat (perplexity ~390 of 389 tokens) and no LoRA on the attention can sharpen them, as a real
    model's trained embeddings can."""
    import shutil

    import torch
    from transformers import GPT2LMHeadModel

    folder = Path(shutil.copytree(tiny_gpt2, tmp_path_factory.mktemp("learnable") / "gpt2"))
    model = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def dialogues(tmp_path) -> Path:
    """Forty small talks in which the bot always says the same: a pattern a LoRA learns in a few steps."""
    path = tmp_path / "talks.jsonl"
    lines = []
    for index in range(40):
        topic = TOPICS[index % len(TOPICS)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"What do you think of {topic}?"},
                                              {"role": "assistant", "content": "I like turtles."}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def perplexities(output: str) -> tuple[float, float]:
    match = re.search(r"Held-out perplexity of the replies: ([\d.]+) before, ([\d.]+) after", output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def test_finetune_writes_an_adapter_that_lowers_perplexity_and_chat_serves_it(cli, tmp_path, learnable_gpt2,
                                                                               model_cache, dialogues):
    config = write_config(tmp_path, learnable_gpt2, model_cache)
    out = tmp_path / "adapter"
    result = cli("finetune", "--config", str(config), "--data", str(dialogues), "--out", str(out),
                 "--max-steps", "60", "--learning-rate", "2e-2", "--batch-size", "4", "--threads", "1",
                 "--samples", "2")
    assert result.returncode == 0, result.stderr
    before, after = perplexities(result.stdout)
    assert after < before / 2, result.stdout  # the pattern is learnt, on dialogues held out from training
    assert "Training done: 60 of 60 steps" in result.stdout
    assert "Serve it with generator.adapter: adapter\n" in result.stdout  # as the config names it: beside it
    assert "user:      What do you think of" in result.stdout and "after:" in result.stdout
    assert (out / "adapter_config.json").is_file() and (out / "chatforge-adapter.json").is_file()
    assert "36 to train on, 4 held out" in result.stderr
    assert "Traceback" not in result.stderr

    (tmp_path / "serve").mkdir()
    served = write_config(tmp_path / "serve", learnable_gpt2, model_cache, adapter=out)
    question = "What do you think of the weather?\n"
    chat, plain = cli("chat", "--config", str(served), stdin=question), cli("chat", "--config", str(config), stdin=question)
    assert chat.returncode == 0 and plain.returncode == 0, chat.stderr + plain.stderr
    assert chat.stdout.strip() and chat.stdout != plain.stdout  # greedy: the adapter, through the normal chat path

    measured = cli("finetune", "--config", str(config), "--data", str(dialogues), "--eval-only",
                   "--adapter", str(out), "--threads", "1", "--samples", "1")
    assert measured.returncode == 0, measured.stderr
    assert measured.stdout.startswith(f"Adapter {out} (LoRA rank 8; 60 training steps;")
    again_before, again_after = perplexities(measured.stdout)  # on all 40 dialogues now, 36 of them trained on
    assert again_after < again_before / 2 and "chatforge finetune: 40 replies\n" in measured.stderr


def test_bad_input_gets_a_clear_message_and_exit_2(cli, tmp_path, tiny_gpt2, model_cache):
    config = write_config(tmp_path, tiny_gpt2, model_cache)
    no_data = cli("finetune", "--config", str(config), "--out", str(tmp_path / "a"))
    assert no_data.returncode == 2
    assert "no data: give --data FILE.jsonl, --from-memory or --corpus NAME" in no_data.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "hello"}\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    result = cli("finetune", "--config", str(config), "--data", str(bad), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and f"{bad}:2:" in result.stderr and "Traceback" not in result.stderr

    unknown = cli("finetune", "--config", str(config), "--corpus", "nonesuch", "--out", str(tmp_path / "c"))
    assert unknown.returncode == 2 and "no corpus named 'nonesuch'; the plugins register: chitchat" in unknown.stderr

    no_out = cli("finetune", "--config", str(config), "--data", str(bad))
    assert no_out.returncode == 2 and "--out DIR is needed" in no_out.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--limit", "5"], "--limit takes the first N dialogues of a --corpus: add --corpus NAME"),
    (["--eval-replies", "0"], "eval_replies must be at least 1, not 0"),
    (["--val-split", "1.5"], "val_split must be between 0 and 1 (exclusive), not 1.5"),
    (["--samples", "-1"], "--samples must be 0 or more, not -1"),
    (["--threads", "0"], "--threads must be at least 1, not 0"),
    (["--adapter", "x"], "--adapter names the adapter --eval-only measures; to train, give --out DIR"),
    (["--resume"], "nothing to resume in "),
])
def test_impossible_options_are_refused_before_anything_loads(arguments, message, tmp_path, tiny_gpt2, model_cache,
                                                              dialogues, capsys):
    from chatforge.cli import main

    config = write_config(tmp_path, tiny_gpt2, model_cache)
    assert main(["finetune", "--config", str(config), "--data", str(dialogues), "--out", str(tmp_path / "new"),
                 *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "loading model" not in err


def test_a_folder_holding_an_adapter_is_refused_before_the_model_loads(tmp_path, tiny_gpt2, model_cache, dialogues,
                                                                      capsys):
    from chatforge.cli import main

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "chatforge-adapter.json").write_text("{}")
    config = write_config(tmp_path, tiny_gpt2, model_cache)
    assert main(["finetune", "--config", str(config), "--data", str(dialogues), "--out", str(tmp_path / "used")]) == 2
    assert capsys.readouterr().err == (f"chatforge finetune: {tmp_path / 'used'} already holds an adapter; choose "
                                       "another --out folder, or go on with --resume\n")


def test_resume_needs_only_the_folder_and_goes_on_with_the_saved_options(cli, tmp_path, learnable_gpt2,
                                                                        model_cache, dialogues):
    config = write_config(tmp_path, learnable_gpt2, model_cache)
    out = tmp_path / "runs" / "turtles"
    first = cli("finetune", "--config", str(config), "--data", str(dialogues), "--out", str(out), "--max-steps", "3",
                "--lora-r", "4", "--learning-rate", "1e-2", "--warmup-steps", "0", "--threads", "1", "--samples", "0",
                "--eval-replies", "3")
    assert first.returncode == 0, first.stderr
    assert "4 held out (3 of them measured: --eval-replies)" in first.stderr
    assert f"Serve it with generator.adapter: {out.relative_to(tmp_path)}" in first.stdout
    again = cli("finetune", "--config", str(config), "--data", str(dialogues), "--out", str(out), "--resume",
                "--max-steps", "5", "--threads", "1", "--samples", "0")
    assert again.returncode == 0, again.stderr
    assert "Training done: 5 of 5 steps" in again.stdout
    training = json.loads((out / "chatforge-adapter.json").read_text())["training"]
    assert {key: training[key] for key in ("lora_r", "lora_alpha", "learning_rate", "warmup_steps", "seed",
                                           "group_by_length", "eval_replies", "val_split", "steps")} == {
        "lora_r": 4, "lora_alpha": 16, "learning_rate": 1e-2, "warmup_steps": 0, "seed": 0, "group_by_length": True,
        "eval_replies": 3, "val_split": 0.1, "steps": 5}
    context = json.loads((learnable_gpt2 / "config.json").read_text())["n_positions"]
    assert training["max_seq_length"] == context  # the model's context window: no prompt cut the bot would see

    changed = cli("finetune", "--config", str(config), "--data", str(dialogues), "--out", str(out), "--resume",
                  "--max-steps", "7", "--lora-r", "8", "--val-split", "0.3", "--threads", "1", "--samples", "0")
    assert changed.returncode == 2 and "trained with lora_r 4 (now 8), val_split 0.1 (now 0.3)" in changed.stderr
    assert "Traceback" not in changed.stderr

    measured = cli("finetune", "--config", str(config), "--data", str(dialogues), "--eval-only", "--adapter", str(out),
                   "--threads", "1", "--samples", "0")
    assert measured.returncode == 0, measured.stderr
    assert "chatforge finetune: 40 replies\n" in measured.stderr  # all the data, not a held-out tenth


def test_ctrl_c_and_failures_end_with_one_line_and_their_exit_code(tmp_path, tiny_gpt2, model_cache, dialogues,
                                                                   monkeypatch, capsys):
    """Ctrl-C while the replies before training are sampled: nothing is saved, and it says so (exit 130, not
    0 as before); Ctrl-C in the loop: a checkpoint, and 130 too; a failure inside training, such as running
    out of memory, is one line with exit 1."""
    from chatforge import finetune_command
    from chatforge.cli import main
    from chatforge.local import finetune

    config = write_config(tmp_path, tiny_gpt2, model_cache)
    arguments = ["finetune", "--config", str(config), "--data", str(dialogues), "--out", str(tmp_path / "a"),
                 "--max-steps", "2", "--threads", "1"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "sample_replies", interrupted)
    assert main(arguments) == 130
    assert capsys.readouterr().err.endswith("chatforge finetune: stopped (Ctrl-C); nothing was trained or saved\n")

    def ctrl_c_at_step_1(bar, info):  # Ctrl-C in the loop: train() saves and reports an interrupted run
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "sample_replies", lambda *args, **kwargs: [])
    monkeypatch.setattr(finetune_command._ProgressBar, "update", ctrl_c_at_step_1)
    assert main(arguments) == 130  # not 0: `finetune && deploy` must not deploy half a run
    captured = capsys.readouterr()
    assert "Training interrupted; a usable checkpoint is saved: 1 of 2 steps" in captured.out
    assert f"go on with --resume --out {tmp_path / 'a'}" in captured.out
    arguments[arguments.index(str(tmp_path / "a"))] = str(tmp_path / "b")  # "a" holds that checkpoint now
    monkeypatch.undo()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 123456789 bytes")

    monkeypatch.setattr(finetune, "sample_replies", lambda *args, **kwargs: [])
    monkeypatch.setattr(finetune, "train", out_of_memory)
    assert main(arguments) == 1
    err = capsys.readouterr().err
    assert err.endswith("chatforge finetune: training failed: RuntimeError: DefaultCPUAllocator: not enough memory: "
                        "you tried to allocate 123456789 bytes (-vv shows where)\n")
    assert "Traceback" not in err
