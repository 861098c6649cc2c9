"""chatforge's local decoding beside what a user would run instead, side by side in one run.

Systems, on the same model, greedy, end-of-sequence suppressed so every run makes the same number of tokens:
  plain fp32          transformers `model.generate` (the baseline)
  chatforge ...       each runtime: torch fp32, `quantize: int8`, `runtime: onnxruntime` with int8
  CTranslate2 int8    its PyPI wheel, the model converted with its own converter (`ct2-transformers-converter`)
  llama.cpp Q8_0, Q4  through `llama-cpp-python` when it is installed (skipped, with the reason, otherwise)

Figures (medians over --rounds rounds, the systems interleaved within each round):
  decode tok/s        batch 1, a ~200-token prompt, 64 new tokens (after the first)
  first token         time to the first new token of that prompt
  follow-up           time to the first token of the 11th turn of a conversation (chatforge keeps the
                      conversation's attention cache; the others compute the whole prompt again)
  8 at once           aggregate tok/s of 8 conversations (chatforge: continuous batching; CTranslate2: one
                      static batch; plain: one after another, measured in the first round only)
  share of bound      decode tok/s against memory bandwidth / bytes of weights read per token (every weight
                      is read once a token at batch 1), with the bandwidth measured here (a STREAM-like read
                      of 1 GiB with torch at the same thread count)

Each (model, thread count) runs in a process of its own (this file with --worker), one after another.

Known problem, not yet fixed: the systems share that process, and its figures come out 2-3x below each
system's own (plain fp32 decodes 10 tok/s here against 24 in bench/generation.py). ONNX Runtime's and
CTranslate2's thread pools likely spin between calls. Do not quote these figures until each system runs in
a process of its own.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python bench/peers.py [--rounds 5] [--models smollm2,gpt2] [--threads 1,2]

About 10 minutes per model and thread count. Writes JSON to --out and prints a table per model.
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
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generation as common  # noqa: E402 - bench/generation.py: the models, the prompt, plain generate

NEW_TOKENS = common.NEW_TOKENS
FOLLOW_UP = "And one more fact, please."
CHATFORGE_VARIANTS = {"chatforge torch fp32": ({}, 4.0), "chatforge quantize: int8": ({"quantize": "int8"}, 1.0),
                      "chatforge onnxruntime int8": ({"runtime": "onnxruntime", "quantize": "int8"}, 1.0)}
"""name -> (generator config overrides, bytes a weight takes in that format)"""


def bandwidth_gb_s(threads: int, repeats: int = 7) -> float:
    """Bytes read per second by a sum over 1 GiB of float32 (the best of `repeats`): what decoding is bound by."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


class System:
    """One way of decoding: batch 1, a follow-up turn, and 8 conversations at once."""

    name: str
    bytes_per_weight: float

    def one(self, ids: list[int]) -> tuple[float, float]:
        """(time to first token, decode tok/s after it) for NEW_TOKENS greedy tokens."""
        raise NotImplementedError

    def follow_up(self, history: list, ids: list[int]) -> float:
        """Time to the first token of the next turn, after the previous turn was answered."""
        raise NotImplementedError

    def eight(self, prompts: list[list[int]], texts: list[str]) -> float:
        """Aggregate tok/s of answering 8 conversations at once."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Plain(System):
    name, bytes_per_weight = "plain transformers fp32", 4.0

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.model.generation_config.eos_token_id = None
        self.eight_measured: float | None = None

    def one(self, ids):
        seconds, first, new = common.plain_generate(self.model, ids)
        return first, (new - 1) / (seconds - first)

    def follow_up(self, history, ids):
        return common.plain_generate(self.model, ids)[1]

    def eight(self, prompts, texts):
        if self.eight_measured is None:  # one after another: minutes, and the same every round
            started = time.perf_counter()
            for ids in prompts:
                common.plain_generate(self.model, ids)
            self.eight_measured = len(prompts) * NEW_TOKENS / (time.perf_counter() - started)
        return self.eight_measured


class Chatforge(System):
    def __init__(self, folder: Path, name: str, overrides: dict, bytes_per_weight: float, threads: int) -> None:
        self.name, self.bytes_per_weight = name, bytes_per_weight
        self.generator = common.chatforge_generator(folder, **{**overrides, "threads": threads})

    def one(self, ids):
        if self.generator.prompt_cache:
            self.generator.prompt_cache.clear()  # the first turn of a conversation: nothing to reuse
        asyncio.run(self.generator.complete(common.PROMPT, NEW_TOKENS))
        stats = self.generator.last_stats
        return stats.first_token_seconds, (stats.new_tokens - 1) / (stats.seconds - stats.first_token_seconds)

    def follow_up(self, history, ids):
        if self.generator.prompt_cache:
            self.generator.prompt_cache.clear()
        asyncio.run(self.generator.reply(history[:-2], history[-2].text))  # the 10th turn leaves its cache
        asyncio.run(self.generator.reply(history, FOLLOW_UP))
        return self.generator.last_stats.first_token_seconds

    def eight(self, prompts, texts):
        if self.generator.prompt_cache:
            self.generator.prompt_cache.clear()
        before = self.generator.generated_tokens
        started = time.perf_counter()

        async def crowd():
            return await asyncio.gather(*(self.generator.reply([], text) for text in texts))

        asyncio.run(crowd())
        return (self.generator.generated_tokens - before) / (time.perf_counter() - started)

    def close(self):
        self.generator.close()


class CTranslate2(System):
    name, bytes_per_weight = "CTranslate2 int8", 1.0

    def __init__(self, folder: Path, threads: int, tokenizer: Any) -> None:
        import ctranslate2

        converted = common.CACHE / "bench" / f"ct2-int8-{folder.name}"
        if not (converted / "model.bin").is_file():
            subprocess.run([str(Path(sys.executable).parent / "ct2-transformers-converter"), "--model", str(folder),
                            "--output_dir", str(converted), "--quantization", "int8", "--force"],
                           check=True, capture_output=True)
        self.generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="int8",
                                               intra_threads=threads, inter_threads=1)
        self.tokenizer = tokenizer
        self.never = [[tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id)]]  # EOS suppressed: fixed length

    def _tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def one(self, ids):
        started = time.perf_counter()
        first, count = None, 0
        for _ in self.generator.generate_tokens(self._tokens(ids), max_length=NEW_TOKENS, sampling_topk=1,
                                                suppress_sequences=self.never):
            count += 1
            if first is None:
                first = time.perf_counter() - started
        seconds = time.perf_counter() - started
        return first, (count - 1) / (seconds - first)

    def follow_up(self, history, ids):
        started = time.perf_counter()
        for _ in self.generator.generate_tokens(self._tokens(ids), max_length=NEW_TOKENS, sampling_topk=1,
                                                suppress_sequences=self.never):
            return time.perf_counter() - started  # no cache across calls: the whole prompt is computed again
        raise AssertionError("CTranslate2 produced no token")

    def eight(self, prompts, texts):
        started = time.perf_counter()
        results = self.generator.generate_batch([self._tokens(ids) for ids in prompts], max_length=NEW_TOKENS,
                                                sampling_topk=1, include_prompt_in_result=False,
                                                suppress_sequences=self.never)
        return sum(len(result.sequences_ids[0]) for result in results) / (time.perf_counter() - started)


def weight_count(folder: Path) -> int:
    """Parameters read per token at batch 1: all of them (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def worker(model: str, threads: int, rounds: int) -> dict[str, Any]:
    """Every system on one model at one thread count, interleaved round by round."""
    import torch

    folder, description = common.load_models([model])[model]
    torch.set_num_threads(threads)
    bandwidth = bandwidth_gb_s(threads)
    torch.set_num_threads(threads)
    weights = weight_count(folder)
    systems: list[System] = [Plain(folder)]
    skipped: dict[str, str] = {}
    for name, (overrides, width) in CHATFORGE_VARIANTS.items():
        systems.append(Chatforge(folder, name, overrides, width, threads))
    tokenizer = systems[1].generator.tokenizer
    try:
        systems.append(CTranslate2(folder, threads, tokenizer))
    except ImportError:
        skipped["CTranslate2 int8"] = "ctranslate2 is not installed: pip install ctranslate2"
    try:
        import llama_cpp  # noqa: F401
        skipped["llama.cpp"] = "llama-cpp-python is installed, but its rows are not written yet"
    except ImportError:
        skipped["llama.cpp Q8_0, Q4_1"] = ("llama-cpp-python is not installed (it compiles llama.cpp, about 10 "
                                          "minutes: see ../shared/OFFLINE.md for the build that works here)")
    builder = systems[1].generator.prompts
    ids = builder.build([], common.PROMPT).input_ids
    history = common.conversation(10)
    follow_ids = builder.build(history, FOLLOW_UP).input_ids
    texts = [f"Conversation {index}: tell me about the sea." for index in range(8)]
    prompts = [builder.build([], text).input_ids for text in texts]
    figures: dict[str, dict[str, list[float]]] = {
        system.name: {"ttft": [], "decode": [], "follow_up": [], "eight": []} for system in systems}
    for round_index in range(rounds):
        order = systems if round_index % 2 == 0 else list(reversed(systems))
        for system in order:
            first, decode = system.one(ids)
            figures[system.name]["ttft"].append(first)
            figures[system.name]["decode"].append(decode)
            figures[system.name]["follow_up"].append(system.follow_up(history, follow_ids))
            figures[system.name]["eight"].append(system.eight(prompts, texts))
        print(f"  {model}, {threads} thread(s): round {round_index + 1} of {rounds} done", file=sys.stderr)
    for system in systems:
        system.close()
    rows = {}
    for system in systems:
        medians = {key: statistics.median(values) for key, values in figures[system.name].items()}
        bound = bandwidth * 1e9 / (weights * system.bytes_per_weight)
        rows[system.name] = {**{key: round(value, 3) for key, value in medians.items()},
                             "bound_tok_s": round(bound, 1), "share_of_bound": round(medians["decode"] / bound, 3)}
    return {"model": description, "threads": threads, "rounds": rounds, "bandwidth_gb_s": round(bandwidth, 1),
            "weights": weights, "prompt_tokens": len(ids), "follow_up_prompt_tokens": len(follow_ids),
            "rows": rows, "skipped": skipped}


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['model']}, {report['threads']} thread(s): bandwidth {report['bandwidth_gb_s']} GB/s, "
          f"{report['weights'] / 1e6:.0f}M weights, medians of {report['rounds']} rounds")
    plain = report["rows"]["plain transformers fp32"]
    print(f"{'':30} {'decode tok/s':>13} {'x plain':>8} {'% bound':>8} {'1st token':>10} {'follow-up':>10} "
          f"{'8 at once':>10}")
    for name, row in report["rows"].items():
        print(f"{name:30} {row['decode']:13.1f} {row['decode'] / plain['decode']:8.2f} "
              f"{100 * row['share_of_bound']:7.0f}% {row['ttft']:9.2f}s {row['follow_up']:9.2f}s {row['eight']:10.1f}")
    for name, reason in report["skipped"].items():
        print(f"{name:30} skipped: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="smollm2,gpt2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("/tmp/chatforge_bench_peers.json"))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.rounds)))
        return
    reports = []
    for model in args.models.split(","):
        for threads in args.threads.split(","):
            done = subprocess.run([sys.executable, __file__, "--worker", model, threads, "--rounds", str(args.rounds)],
                                  stdout=subprocess.PIPE, text=True, check=True)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            print_report(report)
            reports.append(report)
            args.out.write_text(json.dumps(reports, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
