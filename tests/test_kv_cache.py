"""Reusing a conversation's attention cache across turns: same replies, fewer tokens computed, bounded memory."""

from __future__ import annotations

import asyncio

import pytest

from chatforge.config import GeneratorConfig
from chatforge.local.generator import TransformersGenerator
from chatforge.local.kv_cache import PromptCache, cache_nbytes
from chatforge.memory import Turn
from chatforge.local.model_loading import load_model

MESSAGES = [
    "hello there, how are you today?",
    "what is the weather like?",
    "The capital of France is Paris.",
    "chatforge is a chat bot framework written in Python.",
    "Memory keeps each conversation separate.",
    "I am fine, thank you. And you?",
]


@pytest.fixture(scope="module")
def loaded(tiny_gpt2, model_cache):
    return load_model(str(tiny_gpt2), model_cache)


def make_generator(loaded, history_tokens: int = 768, trim_turns: int = 10, **settings) -> TransformersGenerator:
    config = GeneratorConfig(**{"temperature": 0, "max_new_tokens": 16, "system_prompt": "Be nice.", **settings})
    return TransformersGenerator(loaded, config, history_tokens=history_tokens, trim_turns=trim_turns)


def converse(generator: TransformersGenerator, messages: list[str], history: list[Turn] | None = None):
    """Talk as the engine does (history grows by each message and reply); returns replies, streams, stats."""
    history = [] if history is None else history
    replies, streams, stats = [], [], []

    async def talk():
        for text in messages:
            pieces: list[str] = []
            reply = await generator.reply(list(history), text, on_text=pieces.append)
            replies.append(reply)
            streams.append("".join(pieces))
            stats.append(generator.last_stats)
            history.extend([Turn("user", text), Turn("assistant", reply)])

    asyncio.run(talk())
    return replies, streams, stats


def test_follow_ups_reuse_the_cache_and_reply_exactly_as_without_it(loaded):
    cached, plain = make_generator(loaded), make_generator(loaded, kv_cache=False)
    with_reuse, streamed, stats = converse(cached, MESSAGES[:5])
    without, _, plain_stats = converse(plain, MESSAGES[:5])
    cached.close()
    plain.close()
    assert with_reuse == without and streamed == with_reuse
    assert any(with_reuse)  # the tiny model says something, so replies re-enter the prompts
    assert stats[0].reused_tokens == 0
    for previous, turn in zip(stats, stats[1:]):
        # At least the whole previous prompt; its reply too unless it re-tokenises differently.
        assert turn.reused_tokens >= previous.prompt_tokens and turn.computed_tokens < turn.prompt_tokens
    assert [turn.prompt_tokens for turn in stats] == [turn.prompt_tokens for turn in plain_stats]
    assert all(turn.reused_tokens == 0 for turn in plain_stats)


def test_extra_stop_strings_and_a_regenerated_prompt_still_match(loaded):
    settings = {"stop": ["e", "?"], "max_new_tokens": 24}
    cached, plain = make_generator(loaded, **settings), make_generator(loaded, kv_cache=False, **settings)
    messages = MESSAGES[:4] + [MESSAGES[3]]
    other, _, _ = converse(cached, messages[:1])  # someone else opened with the same words
    with_reuse, _, stats = converse(cached, messages)
    without, _, _ = converse(plain, messages)
    cached.close()
    plain.close()
    assert with_reuse == without and other[0] == with_reuse[0]
    assert stats[0].reused_tokens == stats[0].prompt_tokens - 1  # all but the token that gives logits
    # Every turn whose prompt continues the one before reuses its cache. (Where the history outgrows the tiny
    # model's 256-token window it is trimmed and computed afresh; which turn that is depends on the replies.)
    grown = [turn for before, turn in zip(stats, stats[1:]) if turn.prompt_tokens > before.prompt_tokens]
    assert len(grown) >= 2 and all(turn.reused_tokens > 0 for turn in grown)


def scripted_conversation(generator: TransformersGenerator, exchanges: int):
    """Replies and stats of a conversation whose history holds scripted answers (the tiny model's are bytes)."""
    history: list[Turn] = []
    replies, stats = [], []

    async def talk():
        for i in range(exchanges):
            text = f"message {i} about the sea"
            replies.append(await generator.reply(list(history), text))
            stats.append(generator.last_stats)
            history.extend([Turn("user", text), Turn("assistant", f"answer {i} is short")])

    asyncio.run(talk())
    return replies, stats


def test_trimming_history_in_steps_keeps_the_cache_useful_once_the_budget_is_full(loaded):
    # A 160-token history budget holds four exchanges; then the oldest are trimmed and the prompt starts anew.
    results = {}
    for name, settings in {"steps": {"trim_turns": 8}, "one exchange": {"trim_turns": 2},
                           "no cache": {"trim_turns": 8, "kv_cache": False}}.items():
        generator = make_generator(loaded, history_tokens=160, **settings)
        results[name] = scripted_conversation(generator, 24)
        generator.close()
    assert results["steps"][0] == results["no cache"][0]  # reuse never changes a reply
    misses = {name: sum(turn.reused_tokens == 0 for turn in stats[1:]) for name, (_, stats) in results.items()}
    assert misses["one exchange"] >= 12, "the budget never filled: the test proves nothing"
    assert misses["steps"] <= 6 < misses["one exchange"]


def test_least_recently_used_conversation_is_evicted_by_count(loaded):
    generator = make_generator(loaded, kv_cache_conversations=2)
    a, b, c = [], [], []
    converse(generator, ["hello there, I am A"], a)
    converse(generator, ["hello there, I am B"], b)
    _, _, stats = converse(generator, [MESSAGES[1]], a)  # A is now more recent than B
    assert stats[0].reused_tokens > 0
    converse(generator, ["hello there, I am C"], c)  # a third: B, the least recently used, goes
    assert len(generator.prompt_cache) == 2
    _, _, a_stats = converse(generator, [MESSAGES[2]], a)
    _, _, b_stats = converse(generator, [MESSAGES[2]], b)
    generator.close()
    assert a_stats[0].reused_tokens > 0
    assert b_stats[0].reused_tokens == 0


def test_a_cache_over_the_memory_budget_is_not_kept(loaded):
    generator = make_generator(loaded, kv_cache_mb=0.0001)  # ~100 bytes: under one prompt's cache
    _, _, stats = converse(generator, MESSAGES[:3])
    assert len(generator.prompt_cache) == 0
    generator.close()
    assert all(turn.reused_tokens == 0 for turn in stats)


def test_disabled_config_does_no_reuse(loaded):
    generator = make_generator(loaded, kv_cache=False)
    _, _, stats = converse(generator, MESSAGES[:3])
    generator.close()
    assert generator.prompt_cache is None
    assert all(turn.reused_tokens == 0 and turn.computed_tokens == turn.prompt_tokens for turn in stats)


def test_one_off_completions_leave_the_cache_alone_and_close_frees_it(loaded):
    generator = make_generator(loaded)
    converse(generator, MESSAGES[:2])
    assert len(generator.prompt_cache) == 1
    asyncio.run(generator.complete("summarize: " + MESSAGES[3]))
    asyncio.run(generator.complete("summarize: " + MESSAGES[3]))
    assert generator.last_stats.reused_tokens == 0 and len(generator.prompt_cache) == 1
    generator.close()
    assert len(generator.prompt_cache) == 0


# ---------------------------------------------------------------- the pool on its own

def filled_cache(tokens: int):
    """A two-layer DynamicCache holding `tokens` positions (values are irrelevant to the pool)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.zeros(1, 2, tokens, 4), torch.zeros(1, 2, tokens, 4), layer)
    return cache


def test_pool_crops_to_the_common_prefix_and_hands_a_cache_out_once():
    pool = PromptCache(max_entries=4, max_bytes=10**9)
    pool.put([1, 2, 3, 4, 5, 6, 7], prompt_tokens=4, cache=filled_cache(6))  # the last id has no keys yet
    cache, reused = pool.take([1, 2, 3, 4, 5, 9, 9])  # the reply re-tokenised differently after id 5
    assert reused == 5 and cache.get_seq_length() == 5
    assert len(pool) == 0 and pool.take([1, 2, 3, 4, 5, 9, 9]) == (None, 0)  # never shared


def test_pool_leaves_a_cache_whose_prompt_the_new_one_does_not_continue():
    pool = PromptCache(max_entries=4, max_bytes=10**9)
    pool.put([1, 2, 3, 4, 5, 6], prompt_tokens=4, cache=filled_cache(5))
    assert pool.take([1, 2, 8, 8, 8]) == (None, 0)  # shares a system prompt only: another conversation
    assert len(pool) == 1
    cache, reused = pool.take([1, 2, 3, 4])  # the same prompt again: all but its last token
    assert reused == 3 and cache.get_seq_length() == 3


def test_pool_evicts_least_recently_used_beyond_its_byte_budget():
    one = cache_nbytes(filled_cache(10))
    pool = PromptCache(max_entries=10, max_bytes=2 * one)
    for first in (1, 2, 3):
        pool.put([first] * 11, prompt_tokens=5, cache=filled_cache(10))
    assert len(pool) == 2 and pool.nbytes == 2 * one
    assert pool.take([1] * 12) == (None, 0)  # the oldest went
    assert pool.take([3] * 12)[1] == 10
    pool.put([4] * 40, prompt_tokens=5, cache=filled_cache(40))  # over the whole budget: not kept
    assert len(pool) == 1
