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


# ------------------------------------------------------------------ A tiny Qwen2 that chats in Chinese (ChatML)

CJK_CORPUS = [
    "你好！我是一个聊天机器人。",
    "今天天气很好，我们去公园散步吧。",
    "中国的首都是北京。",
    "谢谢你，再见！",
    "我喜欢学习中文和英文。",
    "用户：你好。助手：你好，有什么可以帮你的吗？",
    "hello there, how are you today?",
    "The capital of China is Beijing.",
] * 20
"""Chinese and English for the tiny Qwen2's tokenizer: common characters become one token, the rest stay split
over their UTF-8 bytes, as rare characters and emoji are in Qwen's own 151,643-token vocabulary."""

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_5_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
"""Qwen2.5-Instruct's chat template, as in its tokenizer_config.json: ChatML, with a default system message
when the conversation has none."""


def train_qwen_bpe(vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a byte-level BPE trained on CJK_CORPUS with Qwen2's own pre-tokenizer (its
    split pattern, then bytes to characters) and every byte in the alphabet, so any text can be encoded."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CJK_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A two-layer Qwen2 (Qwen2.5-Instruct's architecture) with a Chinese+English byte-level BPE, Qwen's
    tokenizer class and its ChatML template, saved like a Hub checkpoint. Its random weights are set to
    answer every message with QWEN_REPLY (spell_reply), so a test through the CLI can check the words."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def build_tiny_qwen2(folder: Path) -> Path:
    """Save the tiny Qwen2 (random weights, seed 0) in `folder`, with the special tokens, EOS and generation
    config laid out as Qwen2.5-Instruct's are (<|im_end|> ends a reply, <|endoftext|> pads)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    vocab, merges = train_qwen_bpe()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, bos_token=None, errors="replace",
                               extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = QWEN2_5_CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(folder)
    end_of_text, im_end = (tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_end|>"))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=end_of_text, eos_token_id=im_end)
    model = Qwen2ForCausalLM(config)
    spell_reply(model, tokenizer)
    model.generation_config = GenerationConfig(bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text],
                                               pad_token_id=end_of_text)
    model.save_pretrained(folder)
    return folder


QWEN_REPLY = "你好！有什么可以帮你的吗？😊"
"""What the tiny Qwen2 answers to anything: its emoji is in no merge, so it comes out as four byte tokens."""


def spell_reply(model, tokenizer, reply: str = QWEN_REPLY) -> None:
    """Make `model` (in place) answer `reply` then <|im_end|> after any ChatML prompt, without training.

    The output layer maps each token's own embedding to the token that follows it in "\n" + reply (the
    prompt ends with "<|im_start|>assistant\n"), so greedy decoding walks that chain whatever came before.
    The embeddings are scaled up to dominate the residual stream; the random layers still run and feed the
    attention cache, only too weakly to change which token wins.
    """
    import torch

    chain = [tokenizer.convert_tokens_to_ids("\u010a")]  # "\n" as a byte-level token
    chain += tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "a token repeats in the reply: the chain would loop"
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.mul_(50)
        head = model.get_output_embeddings().weight
        head.zero_()
        for current, following in zip(chain, chain[1:]):
            direction = embeddings[current] / embeddings[current].pow(2).mean().sqrt()  # what the final norm gives
            head[following] = direction
