"""Continuous batching of concurrent replies, on tiny GPT-2 and Llama models built in the tests.

Batched rows must give each conversation exactly what it would get alone:
left padding must never leak into attention or positions.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from chatforge.local.batching import ContinuousBatcher, Job, Sampling
from chatforge.config import GeneratorConfig
from chatforge.local.generator import TransformersGenerator, end_cut_reply
from chatforge.memory import Turn
from chatforge.local.model_loading import LoadedModel, load_model
from chatforge.testing import make_bot

PROMPTS = [f"conversation {i}: " + "tell me about the sea " * (i * 3) for i in range(6)]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2, model_cache):
    return load_model(str(tiny_gpt2), model_cache)


def make_generator(loaded, **settings) -> TransformersGenerator:
    config = GeneratorConfig(**{"temperature": 0, "max_new_tokens": 24, "stop": ["never-appears"], **settings})
    return TransformersGenerator(loaded, config)


def answer_all(generator, prompts, history=()) -> list[str]:
    async def crowd():
        return await asyncio.gather(*(generator.reply(list(history), text) for text in prompts))

    return asyncio.run(crowd())


@pytest.mark.parametrize("model", ["gpt2", "tiny_llama"])
def test_replies_decoded_together_equal_replies_decoded_alone(model, request):
    loaded = request.getfixturevalue(model)
    alone = make_generator(loaded, max_batch=1, kv_cache=False)
    together = make_generator(loaded, max_batch=8, kv_cache=False)
    expected = answer_all(alone, PROMPTS)
    got = answer_all(together, PROMPTS)
    alone.close()
    together.close()
    assert together.batcher.max_batch == 8
    assert together.last_stats.batch_size > 1  # they really were decoded together
    assert got == expected
    assert len(set(got)) > 1  # different prompts, different answers: rows were not mixed up


def test_one_at_a_time_matches_plain_generate(gpt2):
    generator = make_generator(gpt2, max_batch=1, kv_cache=False, repetition_penalty=1.0)
    text = asyncio.run(generator.reply([], PROMPTS[2]))
    generator.close()
    ids = generator.prompts.build([], PROMPTS[2]).input_ids
    with torch.inference_mode():
        out = gpt2.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=generator.last_stats.new_tokens, do_sample=False,
                                  pad_token_id=gpt2.tokenizer.pad_token_id)
    raw = gpt2.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert text == end_cut_reply(raw, streamed=False)  # the limit cut it, so it is ended like any cut reply


def test_seeded_sampling_is_the_same_in_a_batch_as_alone(gpt2):
    settings = {"temperature": 1.0, "seed": 11, "kv_cache": False}
    alone = make_generator(gpt2, max_batch=1, **settings)
    together = make_generator(gpt2, max_batch=8, **settings)
    expected, got = answer_all(alone, PROMPTS), answer_all(together, PROMPTS)
    alone.close()
    together.close()
    assert got == expected


def test_followups_in_a_batch_reuse_each_conversations_cache(tiny_llama):
    history = [Turn("user", "hello there"), Turn("assistant", "hi, how can I help?")]
    prompts = PROMPTS[:2]  # short enough that no history is trimmed from the follow-ups
    cached = make_generator(tiny_llama, max_batch=8)
    fresh = make_generator(tiny_llama, max_batch=8, kv_cache=False)
    expected = answer_all(fresh, prompts, history)
    answer_all(cached, prompts, history)  # leaves one cache per conversation
    follow_history = []
    for text, reply in zip(prompts, expected):
        follow_history.append([*history, Turn("user", text), Turn("assistant", reply)])

    async def follow_ups():
        return await asyncio.gather(*(cached.reply(h, "and then?") for h in follow_history))

    got = asyncio.run(follow_ups())
    want = _sequential(fresh, follow_history)
    cached.close()
    fresh.close()
    assert got == want
    assert cached.last_stats.reused_tokens > 0 and cached.last_stats.batch_size > 1


def _sequential(generator, histories) -> list[str]:
    async def run():
        return [await generator.reply(h, "and then?") for h in histories]

    return asyncio.run(run())


def test_a_request_joins_a_running_batch_and_a_short_reply_leaves_first(gpt2):
    generator = make_generator(gpt2, max_batch=4, kv_cache=False)
    batcher = generator.batcher
    order: list[str] = []
    long_started = threading.Event()
    ids = generator.prompts.build([], "a long story").input_ids

    def long_sink(token: int) -> bool:
        long_started.set()
        return False

    long_job = Job(ids, 120, long_sink, reuse_cache=False)
    short_job = Job(ids, 3, lambda token: False, reuse_cache=False)
    long_job.future.add_done_callback(lambda _: order.append("long"))
    short_job.future.add_done_callback(lambda _: order.append("short"))
    batcher.submit(long_job)
    assert long_started.wait(30)
    batcher.submit(short_job)
    long_stats, short_stats = long_job.future.result(60), short_job.future.result(60)
    generator.close()
    assert order == ["short", "long"]
    assert short_stats.batch_size == 2 and long_stats.batch_size == 2
    assert long_stats.new_tokens == 120 and short_stats.new_tokens == 3


def test_a_failing_request_fails_alone(gpt2):
    generator = make_generator(gpt2, max_batch=4, kv_cache=False)
    batcher = generator.batcher
    good_ids = generator.prompts.build([], "hello").input_ids
    bad = Job([len(gpt2.tokenizer) + 50], 5, lambda token: False)  # a token id past the vocabulary
    good = [Job(good_ids, 8, lambda token: False) for _ in range(2)]
    for job in (good[0], bad, good[1]):
        batcher.submit(job)
    with pytest.raises(IndexError):
        bad.future.result(30)
    assert [job.future.result(30).new_tokens for job in good] == [8, 8]
    assert asyncio.run(generator.reply([], "still serving?"))  # the worker lives on
    generator.close()


def test_a_job_that_ignores_eos_runs_to_its_limit_beside_one_that_stops(gpt2):
    """A benchmark's job makes exactly max_new_tokens tokens; the reply decoded beside it still ends at EOS."""
    generator = make_generator(gpt2, max_batch=2, kv_cache=False)
    batcher = generator.batcher
    batcher.eos_token_ids = set(range(len(gpt2.tokenizer)))  # every token ends a reply
    ids = generator.prompts.build([], "hello").input_ids
    forced, ordinary = Job(ids, 12, lambda token: False, ignore_eos=True), Job(ids, 12, lambda token: False)
    batcher.submit(forced)
    batcher.submit(ordinary)
    assert forced.future.result(30).new_tokens == 12
    assert ordinary.future.result(30).new_tokens == 1
    generator.close()


def test_stopping_ends_replies_at_their_next_token_and_cancels_queued_ones(gpt2):
    generator = make_generator(gpt2, max_batch=1, kv_cache=False)
    batcher = generator.batcher
    ids = generator.prompts.build([], "tell me a long story").input_ids
    seen: list[int] = []

    def sink(token: int) -> bool:
        seen.append(token)
        if len(seen) == 3:
            batcher.stop()  # as the bot does on Ctrl-C or SIGTERM
        return False

    running, queued = Job(ids, 100, sink), Job(ids, 100, lambda token: False)
    batcher.submit(running)
    batcher.submit(queued)
    assert running.future.result(30).new_tokens == 3  # what it had so far is its answer
    generator.close()
    assert queued.future.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(Job(ids, 5, lambda token: False))


def test_a_model_whose_cache_cannot_be_shared_answers_one_at_a_time(gpt2):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(gpt2.tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, sliding_window=16)
    loaded = LoadedModel(MistralForCausalLM(config).eval(), gpt2.tokenizer, "tiny-mistral")
    generator = make_generator(loaded, max_batch=8)
    replies = answer_all(generator, PROMPTS[:3])
    generator.close()
    assert generator.batcher.max_batch == 1
    assert all(replies) and generator.last_stats.batch_size == 1


def test_the_engine_answers_busy_beyond_its_queue_while_the_model_batches(gpt2):
    generator = make_generator(gpt2, max_batch=2, max_new_tokens=40)
    bot = make_bot({"limits": {"max_pending": 3}}, generator=generator)

    async def crowd():
        return await asyncio.gather(*(bot.ask_async(f"hello {i}", user=f"user{i}") for i in range(6)))

    replies = bot._run(crowd())
    generator.close()
    busy = [reply for reply in replies if reply.startswith("I'm busy")]
    assert len(busy) == 3 and len(replies) == 6
    assert generator.batcher.max_batch == 2


def test_a_cancelled_reply_frees_its_place_at_the_next_token(gpt2):
    generator = make_generator(gpt2, max_batch=2, kv_cache=False, max_new_tokens=150)
    first_piece = threading.Event()

    async def cancel_midway():
        task = asyncio.create_task(generator.reply([], "tell me a long story", on_text=lambda _: first_piece.set()))
        while not first_piece.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await generator.reply([], "hello")

    assert asyncio.run(cancel_midway())
    generator.close()
    assert generator.last_stats.batch_size == 1  # the cancelled reply had already left the batch


def test_a_fault_in_the_shared_batch_fails_its_replies_and_the_worker_serves_on(gpt2, monkeypatch):
    from chatforge.local import batching

    generator = make_generator(gpt2, max_batch=2, kv_cache=False)
    batcher = generator.batcher
    ids = generator.prompts.build([], "hello").input_ids
    original_add = batching._Batch.add

    def add_failing_for_a_second_row(self, row, cache):
        if self.rows:
            raise MemoryError("no room to join the batch")
        original_add(self, row, cache)

    monkeypatch.setattr(batching._Batch, "add", add_failing_for_a_second_row)
    first_started = threading.Event()
    first = Job(ids, 150, lambda token: first_started.set() or False)
    second = Job(ids, 150, lambda token: False)
    batcher.submit(first)
    assert first_started.wait(30)
    batcher.submit(second)
    for job in (first, second):
        with pytest.raises(MemoryError):
            job.future.result(30)
    monkeypatch.setattr(batching._Batch, "add", original_add)
    assert asyncio.run(generator.reply([], "still serving?"))
    generator.close()
