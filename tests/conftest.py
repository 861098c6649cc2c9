"""Shared fixtures: offline settings, a tiny GPT-2 built in the test, the embedded SmolLM2."""

from __future__ import annotations

import os

# Before anything imports transformers or huggingface_hub: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you. And you?",
    "The capital of France is Paris.",
    "User: what is the weather like?",
    "Bot: it is sunny and warm.",
    "chatforge is a chat bot framework written in Python.",
    "Memory keeps each conversation separate.",
] * 20


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Small matmuls are far slower with two threads on a busy 2-core machine."""
    import torch

    torch.set_num_threads(1)


def train_byte_bpe(special_tokens: list[str], vocab_size: int = 400):
    """A byte-level BPE (GPT-2's kind of tokenizer) trained in a second on CORPUS."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=special_tokens)
    return bpe._tokenizer


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A two-layer GPT-2 with a byte-level BPE trained here, saved like a real model folder.

    It is loaded through the same `from_pretrained` path as `gpt2` would be;
    its weights are random, so tests check plumbing, not wording.
    """
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def build_tiny_gpt2(folder: Path) -> Path:
    """Save the tiny GPT-2 (random weights, seed 0) in `folder`; also used by bench/flood.py."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(tokenizer_object=train_byte_bpe(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.model_max_length = 256
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_gpt2, model_cache):
    """A two-layer Llama (rotary positions, grouped-query attention) with the tiny GPT-2's tokenizer.

    Kept in memory (a LoadedModel); tests must not change it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.local.model_loading import LoadedModel, load_model

    tokenizer = load_model(str(tiny_gpt2), model_cache).tokenizer
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=eos, eos_token_id=eos)
    return LoadedModel(LlamaForCausalLM(config).eval(), tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Where converted models go during the test session (shared by every test)."""
    return tmp_path_factory.mktemp("chatforge-cache")


CHATFORGE = str(Path(sys.executable).parent / "chatforge")


def run_chatforge(*args: str, stdin: str = "", cwd: Path | None = None, env: dict | None = None,
                  timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `chatforge` command as a user would, offline."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([CHATFORGE, *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=timeout)


@pytest.fixture
def cli():
    return run_chatforge


# ------------------------------------------------------------------ PostgreSQL (memory.backend: postgres)

@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server (tests/postgres.py) for the session; skipped where PostgreSQL is not
    installed, except on CI (CI=true), where these tests must run."""
    from postgres import PostgresNotInstalled, PostgresServer

    try:
        server = PostgresServer()
    except PostgresNotInstalled as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI=true: the PostgreSQL tests must run; .ci/run installs it)")
        pytest.skip(str(exc))
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres, request):
    """The URL of a fresh, empty database on the session's server; dropped after the test."""
    import re
    import secrets

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + "_" + secrets.token_hex(3)
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)
