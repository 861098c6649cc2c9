"""Chatting in Chinese through the local generator: a Qwen2 folder named in the config, its ChatML prompt, and
streaming, stopping and clipping on text whose characters byte-level BPE splits over several tokens.

The model is the tiny Qwen2 of tests/conftest.py (Qwen2.5-Instruct's architecture, tokenizer class and chat
template). Where a test needs particular tokens, `scripted` makes the model choose them: its logits are
overwritten after each forward pass, so the ids go through chatforge's real batching, decoding and stop code.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections import deque
from typing import Iterator, Sequence

import pytest
import torch

from chatforge.app import create_generator
from chatforge.config import GeneratorConfig, load_settings_from_dict
from chatforge.local.generator import TransformersGenerator
from chatforge.local.model_loading import load_model
from chatforge.local.prompt import OPENING, PromptBuilder
from chatforge.memory import Turn
from chatforge.testing import make_bot

from conftest import QWEN_REPLY  # noqa: E402

HALF = "\ufffd"
"""What decoding gives for the bytes of a character whose remaining bytes are still to come."""

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def loaded(tiny_qwen2, model_cache):
    return load_model(str(tiny_qwen2), model_cache)


@pytest.fixture(scope="module")
def transcript_loaded(tiny_qwen2, model_cache):
    """The same model with its chat template removed: chatforge falls back to a User:/Bot: transcript."""
    loaded = load_model(str(tiny_qwen2), model_cache)
    loaded.tokenizer.chat_template = None
    return loaded


def make_generator(loaded, **settings) -> TransformersGenerator:
    config = GeneratorConfig(**{"temperature": 0, "max_new_tokens": 48, "system_prompt": "你是一个助手。",
                                **settings})
    return TransformersGenerator(loaded, config)


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: each Chinese character over three tokens, an emoji over four."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    as_character = bytes_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([as_character[byte] for byte in text.encode("utf-8")])
    assert tokenizer.decode(ids) == text
    return ids


@contextlib.contextmanager
def scripted(model, ids: Sequence[int], then: int) -> Iterator[deque]:
    """While open, the model's next token is the next of `ids`, then `then` (say <|im_end|>) for ever."""
    queue = deque(ids)

    def force(module, args, output):
        chosen = queue.popleft() if queue else then
        output.logits[:, -1, :] = float("-inf")
        output.logits[:, -1, chosen] = 0.0

    handle = model.register_forward_hook(force)
    try:
        yield queue
    finally:
        handle.remove()


def say(generator: TransformersGenerator, text: str, history: Sequence[Turn] = (), stream: bool = True):
    """The reply to `text`, the pieces streamed on the way (None unstreamed) and the generation's stats."""
    pieces: list[str] = []

    async def ask() -> str:
        return await generator.reply(list(history), text, on_text=pieces.append if stream else None)

    reply = asyncio.run(ask())
    return reply, (pieces if stream else None), generator.last_stats


def decoded_prompt(generator: TransformersGenerator, history: Sequence[Turn], text: str) -> str:
    return generator.tokenizer.decode(generator.prompts.build(history, text).input_ids)


# ------------------------------------------------------------------ the Qwen2 folder through chatforge's path

def qwen_config(tiny_qwen2, model_cache) -> dict:
    """A config naming the folder, as a user would write it in YAML."""
    return {"generator": {"model": str(tiny_qwen2), "cache_dir": str(model_cache), "temperature": 0,
                          "max_new_tokens": 32}}


def test_a_qwen2_folder_in_the_config_loads_with_qwens_tokenizer_and_chatml_prompt(tiny_qwen2, model_cache):
    generator = create_generator(load_settings_from_dict(qwen_config(tiny_qwen2, model_cache)))
    try:
        assert type(generator.model).__name__ == "Qwen2ForCausalLM"
        assert type(generator.tokenizer).__name__ == "Qwen2Tokenizer"
        assert generator.prompts.uses_chat_template and generator.stop_sequences == []
        im_end = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert im_end in generator.batcher.eos_token_ids
        system = GeneratorConfig().system_prompt
        assert decoded_prompt(generator, [], "你好") == (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    finally:
        generator.close()


def test_with_no_system_prompt_qwens_template_puts_its_own_default_one(loaded):
    generator = make_generator(loaded, system_prompt="")
    assert decoded_prompt(generator, [Turn("user", "你好"), Turn("assistant", "你好！")], "谢谢") == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！<|im_end|>\n<|im_start|>user\n谢谢<|im_end|>\n<|im_start|>assistant\n")
    generator.close()


@pytest.mark.parametrize("text", ["嗨！", "嗯", "早", "在吗？", "今天天气怎么样？"])
def test_a_chinese_message_gets_no_english_example_exchange(loaded, text):
    """langid is unsure of one-character messages ("嗨！" 0.60, "嗯" 0.51); their script is not English."""
    generator = make_generator(loaded)
    english_example = f"<|im_start|>assistant\n{OPENING[1].text}<|im_end|>"
    assert english_example not in decoded_prompt(generator, [], text)
    assert english_example in decoded_prompt(generator, [], "hello there, how are you today?")
    generator.close()


def test_the_engine_answers_a_chinese_message_from_the_config_naming_the_folder(tiny_qwen2, model_cache):
    config = qwen_config(tiny_qwen2, model_cache)
    bot = make_bot(config, generator=create_generator(load_settings_from_dict(config)))
    try:
        assert bot.ask("你好") == QWEN_REPLY
        assert bot.ask("中国的首都是哪里？") == QWEN_REPLY
        assert [(turn.role, turn.text) for turn in bot.history()] == [
            ("user", "你好"), ("assistant", QWEN_REPLY), ("user", "中国的首都是哪里？"), ("assistant", QWEN_REPLY)]
    finally:
        bot.close()


def test_chatforge_chat_in_pipe_mode_answers_in_chinese(cli, tmp_path, tiny_qwen2, model_cache):
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        generator:
          model: {tiny_qwen2}
          temperature: 0
          max_new_tokens: 32
          cache_dir: {model_cache}
        memory:
          path: memory.sqlite3
    """), encoding="utf-8")
    result = cli("chat", "--config", str(config), stdin="你好\n今天天气怎么样？\n/history\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{QWEN_REPLY}\n{QWEN_REPLY}\n"), result.stdout
    assert f"You: 今天天气怎么样？\nchatforge: {QWEN_REPLY}" in result.stdout
    assert HALF not in result.stdout and "Traceback" not in result.stderr


def test_follow_ups_in_chinese_reuse_the_attention_cache(loaded):
    cached, plain = make_generator(loaded), make_generator(loaded, kv_cache=False)
    messages = ["你好", "今天天气怎么样？", "中国的首都是哪里？", "谢谢你，再见！"]
    runs = {}
    for name, generator in (("cached", cached), ("plain", plain)):
        history: list[Turn] = []
        replies, streams, stats = [], [], []
        for text in messages:
            reply, pieces, stat = say(generator, text, history)
            replies.append(reply)
            streams.append("".join(pieces))
            stats.append(stat)
            history += [Turn("user", text), Turn("assistant", reply)]
        runs[name] = replies, streams, stats
        generator.close()
    replies, streams, stats = runs["cached"]
    assert replies == runs["plain"][0] == [QWEN_REPLY] * len(messages) and streams == replies
    assert stats[0].reused_tokens == 0 and all(stat.reused_tokens == 0 for stat in runs["plain"][2])
    for previous, turn in zip(stats, stats[1:]):
        assert turn.reused_tokens >= previous.prompt_tokens and turn.computed_tokens < turn.prompt_tokens


# ------------------------------------------------------------------ streaming characters split over tokens

MIXED = "你好😀！今天天气很好。鸟语花香🌸，我们去公园散步吧。"


def test_the_tiny_tokenizer_splits_rare_characters_and_emoji_over_tokens(loaded):
    """The premise of the streaming tests: some tokens are parts of a character, as in Qwen's vocabulary."""
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(MIXED, add_special_tokens=False)
    halves = [token for token in ids if HALF in tokenizer.decode([token])]
    assert len(halves) >= 10 and len(ids) > len(MIXED)


@pytest.mark.parametrize("split", ["bytes", "tokenizer"])
def test_split_characters_are_streamed_whole_and_the_stream_is_the_reply(loaded, split):
    tokenizer = loaded.tokenizer
    ids = byte_tokens(tokenizer, MIXED) if split == "bytes" else tokenizer.encode(MIXED, add_special_tokens=False)
    generator = make_generator(loaded, max_new_tokens=len(ids) + 4)
    with scripted(loaded.model, ids, then=tokenizer.eos_token_id):
        reply, pieces, stats = say(generator, "你好")
    with scripted(loaded.model, ids, then=tokenizer.eos_token_id):
        unstreamed, _, _ = say(generator, "你好", stream=False)
    generator.close()
    assert [piece for piece in pieces if HALF in piece] == []
    assert "".join(pieces) == reply == unstreamed == MIXED
    assert len(pieces) > 5 and stats.new_tokens == len(ids) + 1  # streamed as it came; ended by <|im_end|>


def test_a_reply_cut_inside_a_character_by_the_token_limit(loaded):
    tokenizer = loaded.tokenizer
    text = "今天天气很好。我们去公园散步吧，然后"
    limit = len("今天天气很好。我们去".encode()) + 1  # one byte into 公
    generator = make_generator(loaded, max_new_tokens=limit)
    with scripted(loaded.model, byte_tokens(tokenizer, text), then=tokenizer.eos_token_id):
        unstreamed, _, _ = say(generator, "你好", stream=False)
    with scripted(loaded.model, byte_tokens(tokenizer, text), then=tokenizer.eos_token_id):
        streamed, pieces, _ = say(generator, "你好")
    generator.close()
    # Unstreamed: back to the last full sentence, which a Chinese full stop ends with no space after it.
    assert unstreamed == "今天天气很好。"
    # Streamed, shown text stays shown and "…" marks the cut; the half of 公 never appeared while it ran.
    # The half of 公 is never shown, neither while it ran nor in the final text.
    assert "".join(pieces) == streamed == "今天天气很好。我们去…"
    assert HALF not in streamed


def test_whitespace_the_reply_ends_with_is_not_streamed(loaded):
    """A reply is stripped; what was streamed must be the same text, not the text plus a trailing newline."""
    tokenizer = loaded.tokenizer
    generator = make_generator(loaded)
    with scripted(loaded.model, tokenizer.encode("你好。\n\n", add_special_tokens=False), then=tokenizer.eos_token_id):
        reply, pieces, _ = say(generator, "你好")
    generator.close()
    assert reply == "你好。" and "".join(pieces) == reply


# ------------------------------------------------------------------ stop strings in Chinese

@pytest.mark.parametrize("stream", [True, False])
def test_a_chinese_stop_string_split_over_byte_tokens_ends_the_reply_there(loaded, stream):
    tokenizer = loaded.tokenizer
    before, stop = "好的，明天见", "\n用户："
    ids = byte_tokens(tokenizer, before + stop + "再见" * 20)
    generator = make_generator(loaded, stop=[stop], max_new_tokens=64)
    with scripted(loaded.model, ids, then=tokenizer.eos_token_id):
        reply, pieces, stats = say(generator, "明天见？", stream=stream)
    generator.close()
    assert reply == before  # not "好的，明天见…": the stop, not the token limit, ended it
    assert stats.new_tokens == len((before + stop).encode())  # stopped as soon as the stop was complete
    if stream:
        assert "".join(pieces) == reply and not any(HALF in piece for piece in pieces)


def test_a_chinese_transcript_has_plain_role_lines(transcript_loaded):
    generator = make_generator(transcript_loaded)
    assert generator.stop_sequences[:2] == ["\nUser:", "\nBot:"]
    assert decoded_prompt(generator, [Turn("user", "你好"), Turn("assistant", "你好！")], "今天天气怎么样？") == (
        "你是一个助手。\n\nUser: 你好\nBot: 你好！\nUser: 今天天气怎么样？\nBot:")
    generator.close()


@pytest.mark.parametrize("role_line", ["\nUser:", "\nUser：", "\nBot："])
@pytest.mark.parametrize("stream", [True, False])
def test_a_transcript_reply_ends_where_the_model_starts_the_next_role_line(transcript_loaded, role_line, stream):
    """A model continuing a Chinese transcript may write the colon full-width ("User："): that line is not the
    bot's either."""
    tokenizer = transcript_loaded.tokenizer
    answer = " 今天很好。"
    ids = byte_tokens(tokenizer, answer + role_line + " 你呢？" * 5)
    generator = make_generator(transcript_loaded)
    with scripted(transcript_loaded.model, ids, then=tokenizer.eos_token_id):
        reply, pieces, stats = say(generator, "今天天气怎么样？", stream=stream)
    generator.close()
    assert reply == "今天很好。" and stats.new_tokens == len((answer + role_line).encode())
    if stream:
        assert "".join(pieces) == reply and not any(HALF in piece for piece in pieces)


# ------------------------------------------------------------------ clipping Chinese to the context window

def long_history(turns: int) -> list[Turn]:
    return [Turn("user" if index % 2 == 0 else "assistant", f"第{index}轮：鸟语花香，今天天气很好。")
            for index in range(turns)]


def test_a_long_chinese_history_is_cut_by_tokens_newest_kept(loaded):
    tokenizer = loaded.tokenizer
    builder = PromptBuilder(tokenizer, "你是一个助手。", context_window=256, max_new_tokens=56, history_tokens=10_000)
    history = long_history(40)
    prompt = builder.build(history, "最后一个问题")
    text = tokenizer.decode(prompt.input_ids)
    assert len(prompt.input_ids) <= 200 < len(tokenizer.decode(prompt.input_ids)) * 3  # tokens, not characters
    assert 0 < prompt.turns_used < 40 and "第39轮" in text and "第0轮" not in text
    assert text.endswith("<|im_start|>user\n最后一个问题<|im_end|>\n<|im_start|>assistant\n") and HALF not in text


@pytest.mark.parametrize("digits", range(4))
def test_an_over_long_chinese_message_is_clipped_to_whole_characters(loaded, digits):
    """The start is dropped to fit; cutting the token ids can land inside a character, which must go too. Each
    of 鸟语花香 is three tokens here and each digit one, so the digits move the cut across a character."""
    tokenizer = loaded.tokenizer
    builder = PromptBuilder(tokenizer, "你是一个助手。", context_window=256, max_new_tokens=56, history_tokens=768)
    message = "鸟语花香" * 60 + f"（{'1' * digits}）最后一句。"
    prompt = builder.build(long_history(4), message)
    text = tokenizer.decode(prompt.input_ids)
    assert len(prompt.input_ids) <= 200 and prompt.turns_used == 0
    assert text.endswith(f"鸟语花香（{'1' * digits}）最后一句。<|im_end|>\n<|im_start|>assistant\n")
    assert HALF not in text
