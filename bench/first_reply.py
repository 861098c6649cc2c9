"""Start-up and generation figures for `chatforge chat` on this machine.

Measures, for a config (default: the shipped config.yaml, which falls back to
the embedded SmolLM2 when offline):
  * launch to first reply on a second start (the converted model is cached),
    median of --runs starts of the real `chatforge chat` command in pipe mode;
  * peak resident memory of that process;
  * decoding tokens/s of chatforge's generator, and of plain transformers
    `model.generate` on the same model and prompt in the same run, with the ratio.

    .venv/bin/python bench/first_reply.py [--config config.yaml] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CHATFORGE = str(Path(sys.executable).parent / "chatforge")
QUESTION = "What is the capital of France?"
PROMPT = "Tell me a long story about a dragon who learns to cook."


def first_reply(config: Path) -> tuple[float, float]:
    """Seconds from launch to the first reply line on stdout, and the process's peak RSS in MB."""
    started = time.perf_counter()
    process = subprocess.Popen([CHATFORGE, "chat", "-c", str(config)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    process.stdin.write(QUESTION + "\n")
    process.stdin.close()
    line = process.stdout.readline()
    elapsed = time.perf_counter() - started
    process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0 or not line.strip():
        raise SystemExit(f"chatforge chat failed (status {status}); run it by hand to see why")
    return elapsed, usage.ru_maxrss / 1024


def decode_speed(config: Path, runs: int, new_tokens: int = 64) -> tuple[list[float], list[float]]:
    """Tokens/s of chatforge's generator and of plain model.generate, alternating, greedy."""
    import torch

    sys.path.insert(0, str(ROOT))
    from chatforge.app import create_generator
    from chatforge.config import load_settings

    settings = load_settings(config)
    settings.generator.temperature = 0
    settings.generator.max_new_tokens = new_tokens
    settings.generator.stop = []
    generator = create_generator(settings)
    model, tokenizer = generator.model, generator.tokenizer
    ids = generator.prompts.build([], PROMPT).input_ids
    inputs = torch.tensor([ids])
    ours, plain = [], []
    for _ in range(runs):
        asyncio.run(generator.complete(PROMPT, new_tokens))
        stats = generator.last_stats
        ours.append(stats.new_tokens / stats.seconds)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        plain.append((out.shape[1] - inputs.shape[1]) / (time.perf_counter() - started))
    generator.close()
    return ours, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    first_reply(args.config)  # warm-up: converts and caches the model if needed
    starts = [first_reply(args.config) for _ in range(args.runs)]
    ours, plain = decode_speed(args.config, args.runs)
    result = {
        "config": str(args.config),
        "runs": args.runs,
        "launch_to_first_reply_s": round(statistics.median(s for s, _ in starts), 2),
        "peak_rss_mb": round(max(m for _, m in starts)),
        "chatforge_tokens_per_s": round(statistics.median(ours), 1),
        "plain_generate_tokens_per_s": round(statistics.median(plain), 1),
    }
    result["ratio_vs_plain_generate"] = round(result["chatforge_tokens_per_s"] / result["plain_generate_tokens_per_s"], 2)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
