"""chatforge's local decoding beside what a user would run instead, side by side in one run.

Systems, on the same model, greedy, end-of-sequence suppressed so every run makes the same number of tokens:
  plain fp32          transformers `model.generate` (the baseline)
  chatforge ...       each runtime: torch fp32, `quantize: int8`, `runtime: onnxruntime` with int8
  CTranslate2 int8    its PyPI wheel, the model converted with its own converter (`ct2-transformers-converter`)
  llama.cpp Q8_0, Q4_1  through `llama-cpp-python` when it is installed (skipped, with the reason, otherwise);
                      the GGUF files are made with llama.cpp's own converter and quantizer

Figures (medians over --rounds rounds):
  decode tok/s        batch 1, a ~200-token prompt, 64 new tokens (after the first)
  first token         time to the first new token of that prompt
  follow-up           time to the first token of the 11th turn of a conversation, right after the 10th
                      was answered (chatforge and llama.cpp keep the previous prompt's attention cache;
                      plain transformers and CTranslate2 compute the whole prompt again)
  8 at once           aggregate tok/s of 8 short conversations, 64 new tokens each, EOS ignored (chatforge:
                      all submitted at once to its continuous batcher; CTranslate2: one static batch;
                      plain and llama.cpp: one after another, as llama-cpp-python has no parallel slots;
                      plain measured in the first round only, it takes minutes)
  share of bound      decode tok/s against memory bandwidth / bytes of weights read per token (every weight
                      is read once a token at batch 1), with the bandwidth measured here (a STREAM-like read
                      of 1 GiB with torch at the same thread count, in a process of its own)
  peak MB             the system's process's peak resident memory (loading included); serving MB: at the end

Every system runs in a process of its own, loaded once; the parent asks each in turn for one round, so the
systems are interleaved round by round (the order reversed every other round) and only one computes at a
time. Separate processes keep one runtime's thread pool and allocator from slowing the next one down.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python bench/peers.py [--rounds 5] [--models smollm2,gpt2] [--threads 1,2]

The llama.cpp rows need llama-cpp-python built for this CPU (the default build crashes on the first
inference here: the CPU advertises AMX, which the VM cannot run), about 10 minutes:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        .venv/bin/pip install "llama-cpp-python==0.3.36"

The first run downloads that version's source release from PyPI for llama.cpp's converter (cached). For
8 conversations in llama.cpp's parallel slots, build its own server from the same source, about 10 more
minutes, and pass it with --llama-server (or put it on PATH):

    cd ~/.cache/chatforge/bench && tar xzf downloads/llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-server -j2

About 11 minutes per model and thread count (45 for the default four). Writes JSON to --out and prints a table per model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generation as common  # noqa: E402 - bench/generation.py: the models, the prompt, plain generate

NEW_TOKENS = common.NEW_TOKENS
FOLLOW_UP = "And one more fact, please."
PLAIN = "plain transformers fp32"
CHATFORGE = {"chatforge torch fp32": ({}, 4.0), "chatforge quantize: int8": ({"quantize": "int8"}, 1.0),
             "chatforge onnxruntime int8": ({"runtime": "onnxruntime", "quantize": "int8"}, 1.0)}
"""name -> (generator config overrides, bytes a weight takes in that format)"""
CT2 = "CTranslate2 int8"
LLAMA = {"llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_1": "Q4_1"}
"""name -> GGUF type (the bytes read per token are the file's size: llama.cpp keeps a few tensors wider)"""
SYSTEMS = [PLAIN, *CHATFORGE, CT2, *LLAMA]


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


class Workload:
    """The token ids every system gets: the long prompt, the 10th and 11th turns, 8 short conversations.

    Built once by the parent with chatforge's own prompt format and handed to each system's process as JSON,
    so that no process loads a model it does not measure (its peak memory would show it).
    """

    def __init__(self, ids: dict[str, Any]) -> None:
        self.prompt: list[int] = ids["prompt"]
        self.previous: list[int] = ids["previous"]
        self.follow_up: list[int] = ids["follow_up"]
        self.crowd: list[list[int]] = ids["crowd"]
        self.history = common.conversation(10)

    @staticmethod
    def build(folder: Path) -> dict[str, Any]:
        generator = common.chatforge_generator(folder)
        builder, history = generator.prompts, common.conversation(10)
        ids = {"prompt": builder.build([], common.PROMPT).input_ids,
               "previous": builder.build(history[:-2], history[-2].text).input_ids,
               "follow_up": builder.build(history, FOLLOW_UP).input_ids,
               "crowd": [builder.build([], f"Conversation {index}: tell me about the sea.").input_ids
                         for index in range(8)]}
        generator.close()
        return ids


class System:
    """One way of decoding: batch 1, a follow-up turn, and 8 conversations at once."""

    eight_how = "continuous batching"
    weight_bytes: int | None = None
    """Bytes of weights read per token when known exactly (a GGUF file's size); else the nominal width is used."""

    def one(self, work: Workload) -> tuple[float, float]:
        """(time to first token, decode tok/s after it) for NEW_TOKENS greedy tokens."""
        raise NotImplementedError

    def follow_up(self, work: Workload) -> float:
        """Time to the first token of the 11th turn, right after the 10th was answered."""
        raise NotImplementedError

    def eight(self, work: Workload) -> float:
        """Aggregate tok/s of answering 8 conversations at once."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Plain(System):
    eight_how = "one after another"

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.model.generation_config.eos_token_id = None
        self.eight_measured: float | None = None

    def one(self, work):
        seconds, first, new = common.plain_generate(self.model, work.prompt)
        return first, (new - 1) / (seconds - first)

    def follow_up(self, work):
        return common.plain_generate(self.model, work.follow_up)[1]

    def eight(self, work):
        if self.eight_measured is None:  # one after another: minutes, and the same every round
            started = time.perf_counter()
            for ids in work.crowd:
                common.plain_generate(self.model, ids)
            self.eight_measured = len(work.crowd) * NEW_TOKENS / (time.perf_counter() - started)
        return self.eight_measured


class Chatforge(System):
    def __init__(self, folder: Path, overrides: dict, threads: int) -> None:
        self.generator = common.chatforge_generator(folder, **{**overrides, "threads": threads})

    def _fresh(self) -> None:
        if self.generator.prompt_cache:
            self.generator.prompt_cache.clear()  # no head start from an earlier measurement

    def one(self, work):
        self._fresh()
        asyncio.run(self.generator.complete(common.PROMPT, NEW_TOKENS))
        stats = self.generator.last_stats
        return stats.first_token_seconds, (stats.new_tokens - 1) / (stats.seconds - stats.first_token_seconds)

    def follow_up(self, work):
        self._fresh()
        asyncio.run(self.generator.reply(work.history[:-2], work.history[-2].text))  # leaves its cache
        asyncio.run(self.generator.reply(work.history, FOLLOW_UP))
        return self.generator.last_stats.first_token_seconds

    def eight(self, work):
        """The crowd's prompts, NEW_TOKENS each with EOS ignored (as every other system does), all submitted
        at once to the generator's continuous batcher: the same work as CTranslate2's static batch. Like
        CTranslate2's, and unlike llama-server's, it skips per-token detokenizing and stop checks."""
        from chatforge.local.batching import Job

        self._fresh()
        started = time.perf_counter()
        futures = [self.generator.batcher.submit(Job(ids, NEW_TOKENS, lambda token: False, reuse_cache=False,
                                                     ignore_eos=True)) for ids in work.crowd]
        new_tokens = sum(future.result(timeout=600).new_tokens for future in futures)
        return new_tokens / (time.perf_counter() - started)

    def close(self):
        self.generator.close()


class CTranslate2(System):
    eight_how = "one static batch"

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

    def _steps(self, ids: list[int]):
        return self.generator.generate_tokens(self.tokenizer.convert_ids_to_tokens(ids), max_length=NEW_TOKENS,
                                              sampling_topk=1, suppress_sequences=self.never)

    def one(self, work):
        started = time.perf_counter()
        first, count = None, 0
        for _ in self._steps(work.prompt):
            count += 1
            if first is None:
                first = time.perf_counter() - started
        seconds = time.perf_counter() - started
        return first, (count - 1) / (seconds - first)

    def follow_up(self, work):
        for _ in self._steps(work.previous):
            pass
        started = time.perf_counter()
        for _ in self._steps(work.follow_up):
            return time.perf_counter() - started  # no cache across calls: the whole prompt is computed again
        raise AssertionError("CTranslate2 produced no token")

    def eight(self, work):
        started = time.perf_counter()
        results = self.generator.generate_batch([self.tokenizer.convert_ids_to_tokens(ids) for ids in work.crowd],
                                                max_length=NEW_TOKENS, sampling_topk=1, include_prompt_in_result=False,
                                                suppress_sequences=self.never)
        return sum(len(result.sequences_ids[0]) for result in results) / (time.perf_counter() - started)


class LlamaCpp(System):
    """llama.cpp through llama-cpp-python's `Llama`: greedy, its prompt-prefix cache on, as its server has it.

    8 at once goes to llama.cpp's own `llama-server` with 8 parallel slots (continuous batching) when one is
    given (--llama-server or on PATH); llama-cpp-python answers one request at a time, so without it the 8
    conversations are answered one after another.
    """

    def __init__(self, folder: Path, quantization: str, threads: int, server: str | None) -> None:
        from llama_cpp import Llama

        self.gguf = gguf_file(folder, quantization)
        self.model = Llama(model_path=str(self.gguf), n_ctx=2048, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False)
        self.weight_bytes = self.gguf.stat().st_size
        self.server = LlamaServer(server, self.gguf, threads) if server else None
        self.eight_how = "8 parallel slots (llama-server)" if server else "one after another"

    def _timed(self, ids: list[int], keep_prefix: bool) -> tuple[float, float, int]:
        """(seconds, time to first token, tokens) of NEW_TOKENS greedy tokens, whatever they are (EOS included)."""
        if not keep_prefix:
            self.model.reset()  # forget the previous prompt: nothing to reuse
        started = time.perf_counter()
        first, count = 0.0, 0
        for _ in self.model.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter() - started
            if count == NEW_TOKENS:
                break
        return time.perf_counter() - started, first, count

    def one(self, work):
        seconds, first, count = self._timed(work.prompt, keep_prefix=False)
        return first, (count - 1) / (seconds - first)

    def follow_up(self, work):
        self._timed(work.previous, keep_prefix=False)
        return self._timed(work.follow_up, keep_prefix=True)[1]

    def eight(self, work):
        if self.server:
            return self.server.crowd(work.crowd)
        started = time.perf_counter()
        total = sum(self._timed(ids, keep_prefix=False)[2] for ids in work.crowd)
        return total / (time.perf_counter() - started)

    def close(self):
        self.model.close()
        if self.server:
            self.server.close()


class LlamaServer:
    """llama.cpp's `llama-server` on 127.0.0.1 with one slot per conversation, for the 8-at-once figure."""

    def __init__(self, binary: str, gguf: Path, threads: int, slots: int = 8) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "--parallel", str(slots),
             "--ctx-size", str(slots * 1024), "--threads", str(threads), "--threads-batch", str(threads),
             "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{binary} did not start (exit status {self.process.returncode})")
            time.sleep(0.2)

    def _post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> dict[str, Any]:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def _healthy(self) -> bool:
        try:
            return self._post("/health", timeout=2).get("status") == "ok"
        except OSError:
            return False

    def crowd(self, prompts: list[list[int]]) -> float:
        """Aggregate tok/s of the prompts sent at once, each NEW_TOKENS greedy tokens (EOS ignored)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(ids: list[int]) -> int:
            body = {"prompt": ids, "n_predict": NEW_TOKENS, "ignore_eos": True, "temperature": 0.0, "top_k": 1,
                    "cache_prompt": False}
            return self._post("/completion", body)["tokens_predicted"]

        started = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            total = sum(pool.map(one, prompts))
        return total / (time.perf_counter() - started)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def gguf_file(folder: Path, quantization: str) -> Path:
    """The model as a GGUF of this type: llama.cpp's converter to F32, then its quantizer (both cached)."""
    import llama_cpp

    cache = common.CACHE / "bench" / f"gguf-{folder.name}"
    target = cache / f"model-{quantization}.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    full = cache / "model-F32.gguf"
    if not full.is_file():
        converter = llama_converter(llama_cpp.__version__)
        done = subprocess.run([sys.executable, str(converter), str(converter_ready(folder, cache)), "--outtype", "f32",
                               "--outfile", str(full)],
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")})
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"llama.cpp's converter cannot convert {folder.name}: {last}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization}")
    partial = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(full).encode(), str(partial).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {full} to {quantization}")
    partial.rename(target)
    return target


def converter_ready(folder: Path, cache: Path) -> Path:
    """`folder`, or a copy of it (weights linked) whose config has the keys llama.cpp's converter reads.

    transformers 5 no longer writes GPT-2's `n_ctx` (it is `n_positions`); the converter still reads it.
    """
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "gpt2" or "n_ctx" in config:
        return folder
    staged = cache / "hf"
    staged.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name != "config.json" and not (staged / item.name).exists():
            (staged / item.name).symlink_to(item.resolve())
    (staged / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}, indent=2))
    return staged


def llama_converter(version: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from llama-cpp-python's source release of this version (downloaded once)."""
    root = common.CACHE / "bench" / f"llama-cpp-python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    downloads = root.parent / "downloads"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(downloads), f"llama-cpp-python=={version}"],
                   check=True, capture_output=True)
    archive = next(downloads.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        wanted = ("/vendor/llama.cpp/convert_hf_to_gguf.py", "/vendor/llama.cpp/conversion/",
                  "/vendor/llama.cpp/gguf-py/")
        members = [m for m in tar.getmembers() if any(part in m.name for part in wanted)]
        for member in members:
            member.name = member.name.split("/", 1)[1]  # drop the top folder
        tar.extractall(root, members=members, filter="data")
    return script


def open_system(name: str, folder: Path, threads: int, llama_server: str | None) -> System:
    """The system called `name`; ImportError (with the reason) when its library is missing."""
    if name == PLAIN:
        return Plain(folder)
    if name in CHATFORGE:
        return Chatforge(folder, CHATFORGE[name][0], threads)
    if name == CT2:
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise ImportError("ctranslate2 is not installed: pip install -e '.[bench]'") from None
        from transformers import AutoTokenizer

        return CTranslate2(folder, threads, AutoTokenizer.from_pretrained(folder))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ImportError("llama-cpp-python is not installed (it compiles llama.cpp, about 10 minutes: see "
                          "this file's docstring for the build that works here)") from None
    return LlamaCpp(folder, LLAMA[name], threads, llama_server)


def serve(folder: Path, threads: int, name: str, workload: Path, llama_server: str | None) -> None:
    """One system in this process: load, say ready, then one round per `round` line on stdin until `quit`."""
    import torch

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    torch.set_num_threads(threads)
    work = Workload(json.loads(workload.read_text()))
    try:
        system = open_system(name, folder, threads, llama_server)
    except (ImportError, RuntimeError) as exc:  # a missing library, a model the system cannot take
        replies.write(json.dumps({"skipped": str(exc)}) + "\n")
        return
    replies.write(json.dumps({"ready": True, "eight_how": system.eight_how, "weight_bytes": system.weight_bytes,
                              "prompt_tokens": len(work.prompt),
                              "follow_up_tokens": len(work.follow_up)}) + "\n")
    try:
        for line in sys.stdin:
            if line.strip() != "round":
                break
            first, decode = system.one(work)
            replies.write(json.dumps({"ttft": first, "decode": decode, "follow_up": system.follow_up(work),
                                      "eight": system.eight(work)}) + "\n")
        rss_mb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    finally:
        system.close()  # llama.cpp's server too, whatever happened
    replies.write(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "rss_mb": rss_mb}) + "\n")


def compare(model: str, threads: int, rounds: int, names: list[str], llama_server: str | None) -> dict[str, Any]:
    """Every system on one model at one thread count, each in its process, interleaved round by round."""
    bandwidth = float(subprocess.run([sys.executable, __file__, "--bandwidth", str(threads)], stdout=subprocess.PIPE,
                                     text=True, check=True).stdout)
    folder, description = common.load_models([model])[model]
    weights = weight_count(folder)
    workload = common.CACHE / "bench" / f"peers-workload-{folder.name}.json"
    workload.parent.mkdir(parents=True, exist_ok=True)
    workload.write_text(json.dumps(Workload.build(folder)))
    workers: dict[str, subprocess.Popen] = {}
    skipped: dict[str, str] = {}
    figures: dict[str, dict[str, list[float]]] = {}
    memory: dict[str, dict[str, float]] = {}
    info: dict[str, Any] = {}
    ready: dict[str, dict[str, Any]] = {}
    try:
        for name in names:  # loaded one at a time: loading is CPU-heavy
            worker = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), str(threads), name, str(workload),
                                       "--llama-server", llama_server or ""],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            first = json.loads(worker.stdout.readline() or '{"skipped": "the process failed to start (see above)"}')
            if "skipped" in first:
                skipped[name] = first["skipped"]
                stop(worker)
                continue
            info, ready[name] = first, first
            workers[name] = worker
            figures[name] = {"ttft": [], "decode": [], "follow_up": [], "eight": []}
        for round_index in range(rounds):
            order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
            for name in order:
                if name in skipped:
                    continue
                workers[name].stdin.write("round\n")
                line = workers[name].stdout.readline()
                if not line:  # it crashed (its traceback is above): the others go on
                    skipped[name] = f"failed in round {round_index + 1}"
                    continue
                for key, value in json.loads(line).items():
                    figures[name][key].append(value)
            print(f"  {model}, {threads} thread(s): round {round_index + 1} of {rounds} done", file=sys.stderr)
        for name, worker in workers.items():
            if name not in skipped:
                worker.stdin.write("quit\n")
                worker.stdin.flush()
                memory[name] = json.loads(worker.stdout.readline())
    finally:
        for worker in workers.values():
            stop(worker)
    rows = {}
    for name in [name for name in workers if name not in skipped]:
        medians = {key: statistics.median(values) for key, values in figures[name].items()}
        width = CHATFORGE[name][1] if name in CHATFORGE else 1.0 if name == CT2 else 4.0
        bound = bandwidth * 1e9 / (ready[name]["weight_bytes"] or weights * width)
        rows[name] = {**{key: round(value, 3) for key, value in medians.items()}, "eight_how": ready[name]["eight_how"],
                      "peak_mb": round(memory[name]["peak_mb"]), "rss_mb": round(memory[name]["rss_mb"]),
                      "bound_tok_s": round(bound, 1), "share_of_bound": round(medians["decode"] / bound, 3)}
    return {"model": description, "threads": threads, "rounds": rounds, "bandwidth_gb_s": round(bandwidth, 1),
            "weights": weights, "prompt_tokens": info.get("prompt_tokens"),
            "follow_up_prompt_tokens": info.get("follow_up_tokens"), "rows": rows, "skipped": skipped}


def stop(worker: subprocess.Popen) -> None:
    """Let a system's process end (its stdin closed, it closes its llama-server); terminate it, then kill it,
    if it does not."""
    if worker.stdin and not worker.stdin.closed:
        try:
            worker.stdin.close()
        except BrokenPipeError:
            pass
    for ask in (lambda: None, worker.terminate, worker.kill):
        ask()
        try:
            worker.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def weight_count(folder: Path) -> int:
    """Parameters read per token at batch 1: all of them (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['model']}, {report['threads']} thread(s): bandwidth {report['bandwidth_gb_s']} GB/s, "
          f"{report['weights'] / 1e6:.0f}M weights, {report['prompt_tokens']}-token prompt, "
          f"medians of {report['rounds']} rounds")
    plain = report["rows"].get(PLAIN)
    print(f"{'':28} {'decode tok/s':>12} {'x plain':>8} {'% bound':>8} {'1st token':>10} {'follow-up':>10} "
          f"{'8 at once':>10} {'peak MB':>8}")
    for name, row in report["rows"].items():
        ratio = f"{row['decode'] / plain['decode']:8.2f}" if plain else f"{'':8}"
        print(f"{name:28} {row['decode']:12.1f} {ratio} {100 * row['share_of_bound']:7.0f}% {row['ttft']:9.2f}s "
              f"{row['follow_up']:9.2f}s {row['eight']:10.1f} {row['peak_mb']:8}")
    for name, reason in report["skipped"].items():
        print(f"{name:28} skipped: {reason}")
    print("8 at once: " + "; ".join(f"{name}: {row['eight_how']}" for name, row in report["rows"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="smollm2,gpt2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--llama-server", default=shutil.which("llama-server"),
                        help="llama.cpp's llama-server binary, for 8 conversations in parallel slots (default: on PATH)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/chatforge_bench_peers.json"))
    parser.add_argument("--serve", nargs=4, metavar=("FOLDER", "THREADS", "SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), args.serve[2], Path(args.serve[3]), args.llama_server or None)
        return
    if args.bandwidth:
        print(bandwidth_gb_s(args.bandwidth))
        return
    names = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    reports = []
    for model in args.models.split(","):
        for threads in args.threads.split(","):
            report = compare(model, int(threads), args.rounds, names, args.llama_server)
            print_report(report)
            reports.append(report)
            args.out.write_text(json.dumps(reports, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
