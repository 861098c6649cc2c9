"""A reply cut by `max_new_tokens` ends at a sentence boundary or with a visible '…', never mid-word unmarked."""

from __future__ import annotations

import asyncio

import pytest

from chatforge.config import GeneratorConfig
from chatforge.local.generator import TransformersGenerator, end_cut_reply
from chatforge.local.model_loading import load_model


# ------------------------------------------------------------------ the rule, on text

def test_a_cut_reply_is_trimmed_back_to_its_last_sentence():
    text = "Paris is the capital of France. It lies on the Seine. It is known for its muse"
    assert end_cut_reply(text, streamed=False) == "Paris is the capital of France. It lies on the Seine."


def test_trimming_keeps_at_least_half_of_the_reply():
    # The only sentence end is early: dropping most of the reply is worse than marking the cut.
    text = "Yes. Paris has been the capital of France for centuries, and it is home to the Lou"
    assert end_cut_reply(text, streamed=False) == text + "…"


def test_the_last_sentence_end_in_the_tail_wins():
    text = "Paris is the capital of France! It is on the Seine? Yes, it is. And it has many brid"
    assert end_cut_reply(text, streamed=False) == "Paris is the capital of France! It is on the Seine? Yes, it is."


@pytest.mark.parametrize("text", ["It is Paris.", "Really?", "Yes!", "He said \"Paris.\"", "巴黎是法国的首都。", "Done…"])
def test_a_reply_that_already_ends_a_sentence_is_left_alone(text):
    assert end_cut_reply(text, streamed=False) == text
    assert end_cut_reply(text, streamed=True) == text


def test_without_a_sentence_end_the_cut_is_marked():
    assert end_cut_reply("The capital of France is Par", streamed=False) == "The capital of France is Par…"
    assert end_cut_reply("The capital of France is Par  \n", streamed=False) == "The capital of France is Par…"


def test_a_number_or_decimal_point_is_not_a_sentence_end():
    text = "Its area is 105.4 square kilometres and about 2.1 million people live in the ci"
    assert end_cut_reply(text, streamed=False) == text + "…"


def test_a_line_break_in_the_tail_is_a_boundary():
    text = "Three sights:\n1. the Eiffel Tower\n2. the Louvre\n3. Notre-Da"
    assert end_cut_reply(text, streamed=False) == "Three sights:\n1. the Eiffel Tower\n2. the Louvre"


def test_streamed_text_is_never_taken_back_only_marked():
    text = "Paris is the capital of France. It is known for the Eiffel Tower and its muse"
    assert end_cut_reply(text, streamed=True) == text + "…"


def test_nothing_stays_nothing():
    assert end_cut_reply("", streamed=False) == "" and end_cut_reply("  ", streamed=True) == ""


# ------------------------------------------------------------------ the generator applies it

@pytest.fixture(scope="module")
def loaded(tiny_gpt2, model_cache):
    return load_model(str(tiny_gpt2), model_cache)


def generator(loaded, **settings) -> TransformersGenerator:
    config = GeneratorConfig(**{"temperature": 0, "max_new_tokens": 12, "stop": ["never-appears"], **settings})
    return TransformersGenerator(loaded, config)


def raw_reply(loaded, text: str, max_new_tokens: int) -> tuple[str, int]:
    """What the tiny model writes, untouched: its greedy tokens straight from the batcher."""
    from chatforge.local.batching import Job

    gen = generator(loaded, max_new_tokens=max_new_tokens)
    ids: list[int] = []
    job = Job(gen.prompts.build([], text).input_ids, max_new_tokens, lambda token: ids.append(token) and False)
    stats = gen.batcher.submit(job).result(timeout=60)
    gen.close()
    return loaded.tokenizer.decode(ids, skip_special_tokens=True).strip(), stats.new_tokens


def test_a_reply_cut_by_the_token_limit_is_marked(loaded):
    raw, new_tokens = raw_reply(loaded, "hello there", 12)
    assert new_tokens == 12 and raw and not raw.endswith((".", "!", "?", "…"))  # the limit cut it mid-text
    gen = generator(loaded)
    pieces: list[str] = []

    async def talk():
        return await gen.reply([], "hello there"), await gen.reply([], "hello there", on_text=pieces.append)

    unstreamed, streamed = asyncio.run(talk())
    gen.close()
    # (random weights: no sentence end to go back to; a character the limit cut in half is left out)
    assert unstreamed == streamed == raw.removesuffix("\ufffd") + "…"
    assert "".join(pieces) == streamed and pieces[-1] == "…"  # what memory stores is what the user saw


class ScriptedBatcher:
    """Stands in for the model: "generates" the tokens of a given text, as ContinuousBatcher hands them on
    (each to the job's sink until it reports a stop or the limit is reached; an EOS after the text)."""

    def __init__(self, tokenizer, text: str) -> None:
        self.ids = tokenizer.encode(text, add_special_tokens=False)

    def submit(self, job):
        from chatforge.local.batching import GenerationStats

        new_tokens = 0
        for token in self.ids:
            new_tokens += 1
            if job.on_token(token) or new_tokens >= job.max_new_tokens:
                break
        else:
            new_tokens += 1  # the EOS, which is not handed on
        job.future.set_result(GenerationStats(len(job.input_ids), new_tokens, 0.1, 0.01))
        return job.future

    def close(self) -> None:
        pass


SCRIPT = "Paris is the capital of France. It lies on the Seine. It is known for its museums"


def scripted(loaded, text: str, max_new_tokens: int, stream: bool = False, stop: str = "never-appears"):
    gen = generator(loaded, max_new_tokens=max_new_tokens, stop=[stop])
    gen.batcher = ScriptedBatcher(loaded.tokenizer, text)
    pieces: list[str] = []

    async def talk():
        return await gen.reply([], "tell me about Paris", on_text=pieces.append if stream else None)

    return asyncio.run(talk()), pieces


def tokens_of(loaded, text: str) -> int:
    return len(loaded.tokenizer.encode(text, add_special_tokens=False))


def test_an_unstreamed_cut_reply_goes_back_to_its_last_sentence(loaded):
    cut_at = tokens_of(loaded, SCRIPT) - 1  # "...known for its muse|ums"
    reply, _ = scripted(loaded, SCRIPT, cut_at)
    assert reply == "Paris is the capital of France. It lies on the Seine."


def test_a_streamed_cut_reply_keeps_what_was_shown_and_marks_the_cut(loaded):
    cut_at = tokens_of(loaded, SCRIPT) - 1
    reply, pieces = scripted(loaded, SCRIPT, cut_at, stream=True)
    shown = loaded.tokenizer.decode(loaded.tokenizer.encode(SCRIPT, add_special_tokens=False)[:cut_at]).strip()
    assert reply == shown + "…" and "".join(pieces) == reply


def test_a_reply_that_ends_by_itself_is_untouched(loaded):
    reply, _ = scripted(loaded, SCRIPT, tokens_of(loaded, SCRIPT) + 5)  # the EOS came before the limit
    assert reply == SCRIPT


def test_a_reply_ended_by_a_stop_sequence_at_the_limit_is_untouched(loaded):
    text = "It lies on the Seine and has many brid\nUser: and now"
    at_stop = tokens_of(loaded, text[: text.index("\nUser:") + len("\nUser:")])
    for stream in (False, True):
        reply, pieces = scripted(loaded, text, at_stop, stream=stream)  # the stop completes on the last token
        assert reply == "It lies on the Seine and has many brid"
        assert "".join(pieces) == (reply if stream else "")


def test_one_off_instructions_are_ended_cleanly_too(loaded):
    gen = generator(loaded, max_new_tokens=tokens_of(loaded, SCRIPT) - 1)
    gen.batcher = ScriptedBatcher(loaded.tokenizer, SCRIPT)
    assert asyncio.run(gen.complete("summarize this")) == "Paris is the capital of France. It lies on the Seine."
