"""chatforge's generator against plain transformers `model.generate`, measured in the same run.

For each model (the GPT-2 124M shape with random weights, and the embedded
SmolLM2-135M-Instruct) and each chatforge variant (fp32; int8; ONNX Runtime int8
with one thread and with two), it measures:

  decode tok/s        batch 1, a ~200-token prompt, 64 new tokens
  TTFT                time to the first new token of that prompt
  follow-up TTFT      time to first token of the 11th turn of a conversation
                      (chatforge keeps the conversation's KV cache; plain
                      generate recomputes the whole prompt)
  8 / 32 concurrent   aggregate tok/s of 8 (32) conversations answered at once
                      (chatforge decodes up to generator.max_batch, 8, together),
                      against plain generate answering them one after another

Every figure is the median of --runs runs (32 concurrent: one run, it takes
minutes); ratios are chatforge / plain (for times: plain / chatforge).
Engine overhead per message (fake generator), peak memory and cold start to
the first reply come from separate processes. EOS is disabled so that every
run produces exactly the requested number of tokens.

    .venv/bin/python bench/generation.py [--runs 5] [--models gpt2,smollm2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.path.expanduser("~/.cache/chatforge"))
PROMPT = ("Here is a long story about a lighthouse keeper on a small island, the storms of each season, "
          "the ships that pass, the letters she writes and never sends, and the day the light fails. ") * 6
NEW_TOKENS = 64


def load_models(names: list[str]) -> dict[str, tuple]:
    """name -> (model folder, description); the GPT-2 shape is saved once with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from chatforge.local.model_loading import embedded_gguf_file, load_gguf

    smol = load_gguf(embedded_gguf_file(), CACHE)
    smol_folder = Path(smol.model.name_or_path)
    folders = {}
    if "gpt2" in names:
        folder = CACHE / "bench" / "gpt2-124M-shape"
        if not (folder / "config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(smol_folder)
            torch.manual_seed(0)
            # GPT-2's 124M shape; the vocabulary is SmolLM2's tokenizer's (49,152 instead of 50,257),
            # so that ids decode: 123M parameters instead of 124M.
            eos = tokenizer.eos_token_id
            GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos)
                            ).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        folders["gpt2"] = (folder, "GPT-2 124M shape, random weights")
    if "smollm2" in names:
        folders["smollm2"] = (smol_folder, "SmolLM2-135M-Instruct (embedded)")
    return folders


def chatforge_generator(folder: Path, **overrides):
    from chatforge.config import GeneratorConfig
    from chatforge.local.generator import TransformersGenerator
    from chatforge.local.model_loading import load_model
    from chatforge.app import prepare_model

    # Greedy, no repetition penalty: the same decoding as the plain generate it is compared with.
    config = GeneratorConfig(model=str(folder), temperature=0, repetition_penalty=1.0, max_new_tokens=NEW_TOKENS,
                             **{"threads": 1, **overrides}, context_window=2048)
    loaded = load_model(str(folder), CACHE)
    loaded.model = prepare_model(loaded.model, config, CACHE)
    loaded.model.generation_config.eos_token_id = None  # fixed-length runs
    return TransformersGenerator(loaded, config, history_tokens=4096)


class FirstToken:
    """A streamer for plain generate that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first is None:
            self.first = time.perf_counter() - self.started

    def end(self) -> None:
        pass


def plain_generate(model, ids: list[int]) -> tuple[float, float, int]:
    """(seconds, time to first token, new tokens) of one plain greedy `generate`."""
    import torch

    inputs = torch.tensor([ids])
    streamer = FirstToken()
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS,
                             do_sample=False, streamer=streamer, eos_token_id=None,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    return time.perf_counter() - streamer.started, streamer.first or 0.0, out.shape[1] - len(ids)


def conversation(n_turns: int) -> list:
    from chatforge.memory import Turn

    turns = []
    for i in range(n_turns):
        turns.append(Turn("user", f"Tell me fact number {i} about lighthouses, in two sentences please."))
        turns.append(Turn("assistant", "Lighthouses guide ships at night with a bright rotating beam. "
                                       f"This is fact {i}: many were built on rocky islands far from shore."))
    return turns


def measure(folder: Path, runs: int, overrides: dict) -> dict:
    """The figures for one chatforge variant, with plain generate on the same model in the same run."""
    import torch

    generator = chatforge_generator(folder, **overrides)
    torch.set_num_threads(1)  # the baseline's best (two decode no faster); ONNX Runtime has its own threads
    from transformers import AutoModelForCausalLM

    plain_model = AutoModelForCausalLM.from_pretrained(folder).eval()  # the baseline: plain fp32
    ids = generator.prompts.build([], PROMPT).input_ids
    results: dict[str, list[float]] = {key: [] for key in (
        "decode", "plain_decode", "ttft", "plain_ttft", "followup_ttft", "plain_followup_ttft",
        "agg8", "plain_agg8", "agg32", "plain_agg32")}

    async def reply(history, text):
        return await generator.reply(history, text)

    plain_model.generation_config.eos_token_id = None
    history = conversation(10)
    for _ in range(runs):
        asyncio.run(generator.complete(PROMPT, NEW_TOKENS))
        stats = generator.last_stats
        results["decode"].append((stats.new_tokens - 1) / (stats.seconds - stats.first_token_seconds))
        results["ttft"].append(stats.first_token_seconds)
        seconds, first, new = plain_generate(plain_model, ids)
        results["plain_decode"].append((new - 1) / (seconds - first))
        results["plain_ttft"].append(first)

        # Follow-up: the conversation's previous turn leaves its cache; then the 11th message.
        generator.prompt_cache and generator.prompt_cache.clear()
        asyncio.run(reply(history[:-2], history[-2].text))
        asyncio.run(reply(history, "And one more fact, please."))
        results["followup_ttft"].append(generator.last_stats.first_token_seconds)
        follow_ids = generator.prompts.build(history, "And one more fact, please.").input_ids
        results["plain_followup_ttft"].append(plain_generate(plain_model, follow_ids)[1])

    for width, key, rounds in ((8, "agg8", runs), (32, "agg32", 1)):  # 32 x 64 tokens x 2 takes minutes
        for _ in range(rounds):
            prompts = [f"Conversation {i}: tell me about the sea." for i in range(width)]
            generator.prompt_cache and generator.prompt_cache.clear()  # no head start from the last round
            generated_before = generator.generated_tokens
            started = time.perf_counter()

            async def crowd():
                return await asyncio.gather(*(generator.reply([], text) for text in prompts))

            asyncio.run(crowd())
            generated = generator.generated_tokens - generated_before  # a stop sequence may end a reply early
            results[key].append(generated / (time.perf_counter() - started))
            started = time.perf_counter()
            for text in prompts:
                plain_generate(plain_model, generator.prompts.build([], text).input_ids)
            results[f"plain_{key}"].append(width * NEW_TOKENS / (time.perf_counter() - started))
    generator.close()
    medians = {key: statistics.median(values) for key, values in results.items()}
    return {
        "decode_tok_s": round(medians["decode"], 1), "plain_decode_tok_s": round(medians["plain_decode"], 1),
        "decode_ratio": round(medians["decode"] / medians["plain_decode"], 2),
        "ttft_s": round(medians["ttft"], 3), "plain_ttft_s": round(medians["plain_ttft"], 3),
        "ttft_ratio": round(medians["plain_ttft"] / medians["ttft"], 2),
        "followup_ttft_s": round(medians["followup_ttft"], 3),
        "plain_followup_ttft_s": round(medians["plain_followup_ttft"], 3),
        "followup_ttft_ratio": round(medians["plain_followup_ttft"] / medians["followup_ttft"], 2),
        "agg8_tok_s": round(medians["agg8"], 1), "plain_agg8_tok_s": round(medians["plain_agg8"], 1),
        "agg8_ratio": round(medians["agg8"] / medians["plain_agg8"], 2),
        "agg32_tok_s": round(medians["agg32"], 1), "plain_agg32_tok_s": round(medians["plain_agg32"], 1),
        "agg32_ratio": round(medians["agg32"] / medians["plain_agg32"], 2),
    }


def engine_overhead_ms(messages: int = 2000) -> float:
    """Milliseconds per message through the whole engine with the fake generator."""
    from chatforge.testing import make_bot

    bot = make_bot({"memory": {"backend": "memory"}})

    async def run(count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            await bot.ask_async(f"message {i}", user=f"user{i % 50}")
        return (time.perf_counter() - started) / count

    bot._run(run(100))
    return round(bot._run(run(messages)) * 1000, 3)


PLAIN_COLD_START = """
import os, sys, time, resource
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
messages = [{"role": "user", "content": "What is the capital of France?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True), flush=True)
"""


def cold_start(folder: Path, overrides: dict) -> tuple[float, float, float, float]:
    """(chatforge s, plain s, chatforge peak MB, plain peak MB) from launch to the first reply."""
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.yaml"
        extra = "".join(f"  {key}: {value}\n" for key, value in overrides.items())
        config.write_text(f"generator:\n  model: {folder}\n  temperature: 0\n  max_new_tokens: 32\n"
                          f"  cache_dir: {CACHE}\n{extra}memory:\n  backend: memory\n")
        ours = _timed([str(Path(sys.executable).parent / "chatforge"), "chat", "-c", str(config)],
                      "What is the capital of France?\n")
        plain = _timed([sys.executable, "-c", PLAIN_COLD_START, str(folder)], "")
    return ours[0], plain[0], ours[1], plain[1]


def _timed(command: list[str], stdin: str) -> tuple[float, float]:
    """(seconds to the first line of stdout, the process's peak resident memory in MB).

    The peak is read from /proc (VmHWM) while the process runs: a child's
    getrusage figure would start from this (large) benchmark process's own.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak = [0.0]
    watcher = threading.Thread(target=_watch_peak, args=(process, peak), daemon=True)
    watcher.start()
    process.stdin.write(stdin)
    process.stdin.close()
    process.stdout.readline()
    elapsed = time.perf_counter() - started
    process.stdout.read()
    if process.wait():
        raise SystemExit(f"{command[:2]} failed with status {process.returncode}")
    watcher.join()
    return elapsed, peak[0]


def _watch_peak(process: subprocess.Popen, peak: list[float]) -> None:
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="gpt2,smollm2")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "generation.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    variants = {"fp32": {}, "int8": {"quantize": "int8"},
                "onnxruntime-int8": {"runtime": "onnxruntime", "quantize": "int8"},
                "onnxruntime-int8, 2 threads": {"runtime": "onnxruntime", "quantize": "int8", "threads": 2}}
    report = {"runs": args.runs, "new_tokens": NEW_TOKENS, "engine_overhead_ms": engine_overhead_ms(), "models": {}}
    for name, (folder, description) in load_models(args.models.split(",")).items():
        entry = report["models"][name] = {"description": description}
        for variant, overrides in variants.items():
            print(f"measuring {name} {variant}...", file=sys.stderr, flush=True)
            figures = measure(folder, args.runs, overrides)
            ours, plain, our_mb, plain_mb = cold_start(folder, overrides)
            figures.update(cold_start_s=round(ours, 2), plain_cold_start_s=round(plain, 2),
                           peak_mb=round(our_mb), plain_peak_mb=round(plain_mb))
            entry[variant] = figures
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    rows = [("decode tok/s", "decode_tok_s", "plain_decode_tok_s", "decode_ratio"),
            ("time to first token s", "ttft_s", "plain_ttft_s", "ttft_ratio"),
            ("follow-up TTFT s (turn 11)", "followup_ttft_s", "plain_followup_ttft_s", "followup_ttft_ratio"),
            ("8 concurrent, tok/s", "agg8_tok_s", "plain_agg8_tok_s", "agg8_ratio"),
            ("32 concurrent, tok/s", "agg32_tok_s", "plain_agg32_tok_s", "agg32_ratio"),
            ("cold start to first reply s", "cold_start_s", "plain_cold_start_s", None),
            ("peak memory MB", "peak_mb", "plain_peak_mb", None)]
    print(f"engine overhead per message (fake generator): {report['engine_overhead_ms']} ms")
    for name, entry in report["models"].items():
        for variant, figures in entry.items():
            if variant == "description":
                continue
            print(f"\n{entry['description']}, chatforge {variant} vs plain transformers fp32 "
                  f"(median of {report['runs']})")
            print(f"| {'measure':<28} | {'chatforge':>10} | {'plain':>10} | {'ratio':>6} |")
            print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
            for label, ours, plain, ratio in rows:
                shown = f"{figures[ratio]:.2f}x" if ratio else ""
                print(f"| {label:<28} | {figures[ours]:>10} | {figures[plain]:>10} | {shown:>6} |")


if __name__ == "__main__":
    main()
