"""LoRA fine-tuning of the local model on dialogues, with exactly the prompts the generator answers from.

Each assistant turn of a dialogue becomes one example: its prompt is what the
generator's own `PromptBuilder` gives for the turns before it (the chat template
or the User:/Bot: transcript, the system prompt, the history trimmed as at
inference), and its target is the reply followed by what ends a reply there:
EOS with a chat template (the generator stops at EOS), `"\\nUser:"` in the
transcript (the generator stops at that role line; it is also exactly what
follows a reply in the next turn's prompt, whereas EOS never appears in a
transcript). Only the target is in the loss: labels are -100 over the prompt,
so the users' lines and the system prompt are context, never taught.

Training is a plain torch loop over a peft LoRA model: AdamW, linear warmup and
decay, gradient clipping, gradient accumulation (the summed token NLL of all
micro-batches divided by their label tokens, so accumulation equals one big
batch). Only the logits of label positions are computed (`logits_to_keep`),
which cuts a step on a 49k-token vocabulary by about a third.

The out folder holds a servable adapter (peft's `save_pretrained`, the
chatforge card) and `training_state.pt` (the LoRA weights, optimizer, scheduler,
step, RNG): the batches of step n are a function of the seed and n, so a
resumed run continues exactly where the saved one stopped. Ctrl-C finishes the
current step, saves and returns (a second Ctrl-C stops at once, saving the last
finished step).

torch, transformers and peft are imported only when training or measuring, so
the CLI can import `TrainingOptions` cheaply.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..memory import Turn, window_start
from .adapter_card import CARD_NAME, weights_fingerprint, write_card
from .model_loading import LoadedModel
from .prompt import PromptBuilder, _one_line, _text_ids, USER_LABEL

log = logging.getLogger("chatforge.finetune")

STATE_NAME = "training_state.pt"
STATE_FORMAT = 2
"""2: per-epoch batches (the last one smaller), group_by_length, and the hashes of the trained examples."""
MAX_GRAD_NORM = 1.0
IGNORE = -100
"""The label of a position outside the loss (what torch's cross entropy ignores)."""

RESUMABLE_CHANGES = ("max_steps", "epochs", "save_every")
"""Options a resumed run may change: how long it goes on and how often it saves, nothing it has learnt with."""

LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_TARGETS: dict[str, tuple[list[str], bool]] = {
    # GPT-2's attention is two Conv1D layers (weights stored transposed, hence fan_in_fan_out); a bare
    # "c_proj" would also take the MLP's.
    "gpt2": (["attn.c_attn", "attn.c_proj"], True),
    **{family: (LLAMA_STYLE, False) for family in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2",
                                                   "smollm3", "olmo", "olmo2")},
}
"""The attention projections LoRA trains, per `config.model_type`, and whether they are Conv1D."""


class FinetuneError(Exception):
    """Training cannot start or go on; the message says why and what to do."""


@dataclass
class TrainingOptions:
    max_steps: int | None = None
    """Optimizer steps; when unset, `epochs` passes over the training examples."""
    epochs: float = 1.0
    learning_rate: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    batch_size: int = 4
    gradient_accumulation: int = 1
    """Micro-batches of `batch_size` per optimizer step (a larger batch in the same memory)."""
    max_seq_length: int | None = 512
    """None only until a caller sets it from the model (the CLI: the generator's context window)."""
    seed: int = 0
    save_every: int = 50
    """Steps between checkpoints (0: only at the end)."""
    warmup_steps: int = 10
    group_by_length: bool = True
    """Batch examples of similar length together (see `epoch_order`): less padding, faster steps."""
    val_split: float = 0.1
    """The share of the dialogues held out, and at most how many of their replies are measured: used by the
    command that splits the data, kept here so that a resumed run holds out the same."""
    eval_replies: int = 200

    def __post_init__(self) -> None:
        at_least_one = ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation", "max_seq_length",
                        "eval_replies")
        problems = [f"{name} must be at least 1, not {getattr(self, name)}" for name in at_least_one
                    if getattr(self, name) is not None and getattr(self, name) < 1]
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1, not {self.max_steps}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            problems.append(f"epochs must be a number above 0, not {self.epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate must be above 0, not {self.learning_rate}")
        if not 0 < self.val_split < 1:
            problems.append(f"val_split must be between 0 and 1 (exclusive), not {self.val_split}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be from 0 up to (not including) 1, not {self.lora_dropout}")
        problems += [f"{name} must not be negative, not {getattr(self, name)}"
                     for name in ("save_every", "warmup_steps") if getattr(self, name) < 0]
        if problems:
            raise FinetuneError("training options: " + "; ".join(problems))


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """The reply's ids where the model is taught, IGNORE (-100) over the prompt."""
    source: str = ""
    """Where the reply came from: the dialogue's source and the turn's index."""

    @property
    def prompt_length(self) -> int:
        return next((i for i, label in enumerate(self.labels) if label != IGNORE), len(self.labels))


class ExampleSet(list):
    """The examples of `build_examples`, and what became of the replies that did not fit as they were."""

    shortened: int = 0
    """Examples whose prompt was cut (oldest history, then the message's start) so that the reply fits."""
    too_long: int = 0
    """Replies dropped because they alone, with their end marker, exceed max_seq_length."""
    own_system: int = 0
    """Dialogues that came with a system prompt of their own other than the builder's (not used: the bot
    answers with its configured one, so that is what it is trained with)."""


@dataclass
class SamplePrompt:
    """A held-out message to answer before and after training, and the reply the data has for it."""

    history: tuple[Turn, ...]
    text: str
    reference: str


@dataclass
class ProgressInfo:
    step: int
    total_steps: int
    loss: float
    """This step's mean NLL per reply token."""
    learning_rate: float
    """The rate this step was taken with."""
    seconds_per_step: float
    """Over the last few steps."""
    seconds_left: float
    epoch: float
    """Passes over the training examples so far."""


@dataclass
class TrainingReport:
    out_dir: Path
    steps_done: int
    total_steps: int
    interrupted: bool
    losses: list[float]
    """Every step's loss, from the first (also those of the run this one resumed)."""
    perplexity_before: float | None
    perplexity_after: float | None
    """None without held-out examples (or when the measurement after was interrupted)."""
    seconds: float
    seconds_per_step: float
    """Mean over this run's steps."""
    resumed_from: int = 0
    train_examples: int = 0
    held_out_examples: int = 0
    model: Any = field(default=None, repr=False)
    """The trained peft model (the base's layers now carry the LoRA ones), for sample replies after."""


# ---------------------------------------------------------------------------------------------- examples

def build_examples(dialogues: Sequence[Any], builder: PromptBuilder, tokenizer: Any, max_seq_length: int,
                   max_turns: int | None = None) -> ExampleSet:
    """One example per assistant reply that follows a user turn, its prompt the generator's for that point.

    With `max_turns` (the config's `memory.max_turns`) the history is the window the engine would recall
    from a conversation of that length; without it, all the turns before. An example longer than
    `max_seq_length` gets the prompt the builder makes for a context just big enough for the reply
    (oldest turns dropped first, then the message's start, as at inference); a reply that cannot fit
    whole is dropped. A dialogue's own system prompt is not used: the bot answers with the builder's.
    """
    examples = ExampleSet()
    end = _end_marker(builder, tokenizer)
    for dialogue in dialogues:
        turns = list(dialogue.turns)
        system = getattr(dialogue, "system", None)
        if system and system.strip() != builder.system_prompt.strip():
            examples.own_system += 1
        for i, turn in enumerate(turns):
            if not _to_learn(turns, i):
                continue
            before, message = turns[:i - 1], turns[i - 1].text
            if max_turns is not None:
                before = before[window_start(len(before), max_turns):]
            target = _reply_ids(builder, tokenizer, turn.text) + end
            prompt = builder.build(before, message).input_ids
            if len(prompt) + len(target) > max_seq_length:
                prompt = _prompt_within(builder, before, message, max_seq_length - len(target))
                if prompt is None:
                    examples.too_long += 1
                    continue
                examples.shortened += 1
            examples.append(Example(tuple(prompt + target), tuple([IGNORE] * len(prompt) + target),
                                    f"{getattr(dialogue, 'source', '')}#{i}"))
    return examples


def sample_prompts(dialogues: Sequence[Any], count: int) -> list[SamplePrompt]:
    """The first user message of each of the first `count` dialogues that have a reply to it."""
    prompts = []
    for dialogue in dialogues:
        turns = list(dialogue.turns)
        for i in range(1, len(turns)):
            if _to_learn(turns, i):
                prompts.append(SamplePrompt(tuple(turns[:i - 1]), turns[i - 1].text, turns[i].text.strip()))
                break
        if len(prompts) >= count:
            break
    return prompts


def _to_learn(turns: Sequence[Turn], i: int) -> bool:
    """Whether turn i is a reply to learn: an assistant's answer to a user, not marked context-only."""
    turn = turns[i]
    return (turn.role == "assistant" and i > 0 and turns[i - 1].role == "user" and bool(turn.text.strip())
            and turn.meta.get("learn") is not False)


def _reply_ids(builder: PromptBuilder, tokenizer: Any, reply: str) -> list[int]:
    """The reply as the next turn's prompt spells it: the generator stores replies stripped, and the
    transcript writes them on one line after "Bot:"."""
    reply = reply.strip()
    return _text_ids(tokenizer, reply if builder.uses_chat_template else f" {_one_line(reply)}")


def _end_marker(builder: PromptBuilder, tokenizer: Any) -> list[int]:
    """What the model learns to write after a reply: what makes the generator stop there."""
    if builder.uses_chat_template:
        if tokenizer.eos_token_id is None:
            raise FinetuneError("this tokenizer has a chat template but no EOS token to end a reply with")
        return [tokenizer.eos_token_id]
    return _text_ids(tokenizer, f"\n{USER_LABEL}:")


def _prompt_within(builder: PromptBuilder, before: list[Turn], message: str, room: int) -> list[int] | None:
    """The builder's prompt for a context of `room` tokens, or None if the template alone is longer."""
    if room < 1:
        return None
    smaller = copy.copy(builder)
    smaller.prompt_budget = room
    ids = smaller.build(before, message).input_ids
    return ids if len(ids) <= room else None


# ---------------------------------------------------------------------------------------------- measuring

def spread(examples: Sequence[Example], count: int) -> list[Example]:
    """At most `count` of the examples, evenly spread over them (so over all their dialogues), in order."""
    if count >= len(examples):
        return list(examples)
    return [examples[(i * len(examples)) // count] for i in range(max(1, count))]


def held_out_perplexity(model: Any, examples: Sequence[Example], batch_size: int) -> float:
    """exp(mean NLL per reply token) over the examples: how surprised the model is by the replies."""
    import torch

    if not examples:
        raise FinetuneError("no held-out examples to measure perplexity on")
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    ordered = sorted(examples, key=lambda example: len(example.input_ids))  # less padding
    try:
        with torch.no_grad():
            for start in range(0, len(ordered), max(1, batch_size)):
                nll, count = _nll_sum(model, _collate(ordered[start:start + batch_size], _device(model)))
                total += float(nll.detach())
                tokens += int(count)
    finally:
        model.train(was_training)
    return math.exp(total / tokens)


def sample_replies(model: Any, builder: PromptBuilder, tokenizer: Any, prompts: Sequence[Any],
                   max_new_tokens: int) -> list[str]:
    """Greedy replies to `prompts` (SamplePrompts, or (history, text) pairs), cut at the generator's stops."""
    import torch
    from transformers import GenerationConfig

    from .generator import _eos_token_ids, _StopAwareStreamer

    eos = sorted(_eos_token_ids(model, tokenizer))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    was_training = model.training
    model.eval()
    replies = []
    try:
        for prompt in prompts:
            history, text = (prompt.history, prompt.text) if isinstance(prompt, SamplePrompt) else prompt
            ids = builder.build(list(history), text).input_ids
            input_ids = torch.tensor([ids], device=_device(model))
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        generation_config=config)
            streamer = _StopAwareStreamer(tokenizer, builder.reply_stops, None)
            for token in output[0, len(ids):].tolist():
                if streamer.put(token):
                    break
            replies.append(streamer.final_text())
    finally:
        model.train(was_training)
    return replies


@dataclass
class _Batch:
    input_ids: Any
    attention_mask: Any
    labels: Any


def _collate(examples: Sequence[Example], device: Any) -> _Batch:
    """Right-padded tensors; padding is masked out of attention and loss (its id does not matter)."""
    import torch

    width = max(len(example.input_ids) for example in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return _Batch(ids.to(device), mask.to(device), labels.to(device))


def _nll_sum(model: Any, batch: _Batch) -> tuple[Any, Any]:
    """The summed NLL of the batch's label tokens, and how many there are.

    The logit at position t predicts token t+1, so only positions whose next token is a label are computed.
    """
    import torch.nn.functional as F

    targets = batch.labels[:, 1:]
    wanted = targets != IGNORE
    positions = wanted.any(0).nonzero().squeeze(1)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions).logits
    else:
        logits = model(**inputs).logits[:, positions]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten(), ignore_index=IGNORE,
                          reduction="sum")
    return nll, wanted.sum()


def _takes_logits_to_keep(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _device(model: Any) -> Any:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------- training

def lora_config(model: Any, options: TrainingOptions) -> Any:
    """peft's LoraConfig for this architecture's attention projections."""
    from peft import LoraConfig, TaskType
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(model.config, "model_type", "") or ""
    targets, fan_in_fan_out = LORA_TARGETS.get(model_type, (PEFT_DEFAULTS.get(model_type), False))
    names = [name for name, _ in model.named_modules()]
    if not targets or not all(any(n == t or n.endswith(f".{t}") for n in names) for t in targets):
        known = ", ".join(sorted(LORA_TARGETS))
        raise FinetuneError(
            f"chatforge does not know which layers of a {model_type or type(model).__name__!r} model to train "
            f"with LoRA (it knows {known}, and the architectures peft knows); fine-tune one of those")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=options.lora_r, lora_alpha=options.lora_alpha,
                      lora_dropout=options.lora_dropout, target_modules=list(targets),
                      fan_in_fan_out=fan_in_fan_out)


GROUP_OF_BATCHES = 50
"""With group_by_length, examples of similar length are batched together within runs of this many batches
(transformers' "megabatches" for its `group_by_length`): a shuffle still, but with little padding."""


def epoch_order(lengths: Sequence[int], seed: int, epoch: int, batch_size: int, group_by_length: bool) -> list[int]:
    """The order of the examples in an epoch: a seeded shuffle; with `group_by_length`, each run of
    GROUP_OF_BATCHES batches of it sorted by length, cut into batches, and those batches shuffled, so that a
    batch pads its examples little (random batches of chitchat replies were 1.47-1.65 times their tokens once
    padded, grouped ones 1.02-1.07) and the lengths of successive batches still vary at random."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return order
    run = GROUP_OF_BATCHES * batch_size
    grouped, short = [], []
    for start in range(0, len(order), run):
        ranked = sorted(order[start:start + run], key=lambda i: lengths[i])
        batches = [ranked[k:k + batch_size] for k in range(0, len(ranked), batch_size)]
        if len(batches[-1]) < batch_size:  # the epoch's one short batch goes last: the others stay aligned
            short = batches.pop()
        grouped += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return grouped + short


def warmup_for(options: TrainingOptions, total: int) -> int:
    """The warmup steps: the option's, but at most a tenth of the run, so a short run reaches its rate."""
    return min(options.warmup_steps, math.ceil(total / 10))


def rate_factor(step: int, warmup: int, total: int) -> float:
    """The share of the learning rate for the step after `step` steps: up to 1 over `warmup` steps (the first
    step already moves: transformers' linear schedule starts at 0), then down linearly, the last step > 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / (total - warmup + 1))


def total_steps(options: TrainingOptions, examples: int) -> int:
    """Optimizer steps of a run: `max_steps`, else enough for `epochs` passes over the examples."""
    batches = options.epochs * math.ceil(examples / options.batch_size)
    return options.max_steps or max(1, math.ceil(batches / options.gradient_accumulation))


def saved_options(out_dir: Path) -> TrainingOptions | None:
    """The options the run saved in `out_dir` trained with (for a CLI resuming it), or None."""
    state = _read_state(Path(out_dir))
    if state is None:
        return None
    known = {f.name for f in dataclasses.fields(TrainingOptions)}
    return TrainingOptions(**{name: value for name, value in state["options"].items() if name in known})


def train(loaded: LoadedModel, builder: PromptBuilder, train_examples: Sequence[Example],
          held_out: Sequence[Example], options: TrainingOptions, out_dir: Path, resume: bool = False,
          on_progress: Callable[[ProgressInfo], None] | None = None) -> TrainingReport:
    """Train a LoRA adapter on `train_examples`, saving it in `out_dir`; perplexity on `held_out` before/after.

    The base model in `loaded` gets the LoRA layers in place (the report's `model` is the peft model), so
    take sample replies of the base before. KeyboardInterrupt, from Ctrl-C or the progress callback, ends
    training with a saved, servable and resumable checkpoint and a report that says it was interrupted.
    """
    import torch

    out_dir = Path(out_dir)
    started = time.monotonic()
    if not train_examples:
        raise FinetuneError("no training examples: the data has no assistant reply that follows a user message "
                            "and fits max_seq_length")
    state = _read_state(out_dir)
    if resume and state is None:
        raise FinetuneError(f"nothing to resume in {out_dir}: it has no {STATE_NAME} (start without resume)")
    if not resume and (state is not None or (out_dir / CARD_NAME).exists()):
        raise FinetuneError(f"{out_dir} already holds an adapter; choose another folder, or resume its training")
    if _has_lora(loaded.model):
        raise FinetuneError("this model already has LoRA layers; load the base model afresh to train again")
    total = total_steps(options, len(train_examples))
    config = lora_config(loaded.model, options)  # an unknown architecture is refused before anything is measured
    if state is not None:
        _check_resumable(state, options)
        if state["prompt"] != _prompt_format(builder):
            raise FinetuneError(f"the run in {out_dir} was trained on other prompts ({_describe(state['prompt'])}, "
                                f"now {_describe(_prompt_format(builder))}); resume it with the same "
                                "generator.system_prompt and model")
        if state["step"] >= total:
            raise FinetuneError(f"the run in {out_dir} has done its {state['step']} steps already; to train "
                                f"further, resume it with more steps (max_steps above {state['step']})")

    interrupts = _Interrupts()
    try:
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            fingerprint = weights_fingerprint(loaded.model)  # of the base, before LoRA
            if state is not None and state["fingerprint"] != fingerprint:
                raise FinetuneError(f"{out_dir} was trained on another base model ({state['base']}); resume it "
                                    "with the model it started on")
            before = None
            if state is not None and _newly_held_out_but_trained(state, held_out):
                raise FinetuneError(
                    f"some held-out replies were among the training examples of the run saved in {out_dir}: their "
                    "perplexity would flatter the adapter; resume with the same data, --val-split and --seed")
            if held_out:
                if state is not None and state["held_out_digest"] == _digest(held_out):
                    before = state["perplexity_before"]
                else:  # new held-out replies (a conversation from memory went on): measured on the base
                    with interrupts.immediate():  # nothing trained yet, nothing to save
                        before = held_out_perplexity(loaded.model, held_out, options.batch_size)
            if state is not None and state["train_digest"] != _digest(train_examples):
                log.warning("the training examples differ from those of the run saved in %s: it goes on with "
                            "the new ones, so it does not continue exactly", out_dir)
            run = _Run(loaded, builder, train_examples, held_out, options, out_dir, fingerprint, before, state,
                       total, config)
            return run.go(interrupts, on_progress, started)
    finally:
        interrupts.restore()


class _Run:
    """One training run: the peft model, optimizer and schedule, and the loop over steps."""

    def __init__(self, loaded: LoadedModel, builder: PromptBuilder, train_examples: Sequence[Example],
                 held_out: Sequence[Example], options: TrainingOptions, out_dir: Path, fingerprint: str,
                 before: float | None, state: dict | None, total: int, config: Any) -> None:
        import torch
        from peft import get_peft_model, set_peft_model_state_dict

        self.loaded, self.builder, self.options, self.out_dir = loaded, builder, options, out_dir
        self.examples, self.held_out = list(train_examples), list(held_out)
        self.fingerprint, self.before = fingerprint, before
        self.total = total
        torch.manual_seed(options.seed)
        self.config = config
        self.model = get_peft_model(loaded.model, self.config)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.learning_rate, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(rate_factor, warmup=warmup_for(options, self.total), total=self.total))
        self.step, self.losses = 0, []
        self.orders: dict[int, list[int]] = {}
        if state is not None:
            set_peft_model_state_dict(self.model, state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.random.set_rng_state(state["rng"])
            self.step, self.losses = state["step"], list(state["losses"])
        self.earlier_hashes: set[str] = set(state["trained_hashes"]) if state is not None else set()
        """What the run trained on before it was resumed (with other data, perhaps): never to be held out."""
        self.resumed_from = self.step

    def go(self, interrupts: "_Interrupts", on_progress: Callable[[ProgressInfo], None] | None,
           started: float) -> TrainingReport:
        import torch

        self.model.train()
        durations: list[float] = []
        random_state, cutting = None, False
        while self.step < self.total:
            try:
                if interrupts.requested:
                    raise KeyboardInterrupt
                random_state, cutting = torch.random.get_rng_state(), True
                began = time.monotonic()
                rate = self.scheduler.get_last_lr()[0]
                loss = self._forward_backward()
                # The update, its record and its progress report happen whole or not at all: a step that
                # counts is always reported, so the user is never told of fewer steps than were saved.
                with interrupts.deferred():
                    torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.losses.append(loss)
                    cutting = False
                    durations.append(time.monotonic() - began)
                    if on_progress is not None:
                        recent = durations[-10:]
                        per_step = sum(recent) / len(recent)
                        on_progress(ProgressInfo(self.step, self.total, loss, rate, per_step,
                                                 per_step * (self.total - self.step), self._epoch()))
                if self.options.save_every and self.step % self.options.save_every == 0 and self.step < self.total:
                    with interrupts.deferred():
                        self._save(interrupted=False, after=None)
            except KeyboardInterrupt:
                if cutting:  # a step cut short leaves no trace, not even in dropout's draws
                    self.optimizer.zero_grad(set_to_none=True)
                    torch.random.set_rng_state(random_state)
                break
        interrupted = self.step < self.total
        with interrupts.deferred(raise_after=False):
            self._save(interrupted, after=None)
        after = None
        if self.held_out:
            try:
                with interrupts.immediate():
                    after = held_out_perplexity(self.model, self.held_out, self.options.batch_size)
            except KeyboardInterrupt:
                log.warning("held-out perplexity after training not measured (interrupted)")
            else:
                with interrupts.deferred(raise_after=False):
                    self._write_card(interrupted, after)
        self.model.eval()
        return TrainingReport(
            self.out_dir, self.step, self.total, interrupted, list(self.losses), self.before, after,
            time.monotonic() - started, sum(durations) / len(durations) if durations else 0.0, self.resumed_from,
            len(self.examples), len(self.held_out), self.model)

    def _forward_backward(self) -> float:
        """Gradients of one step's micro-batches; the step's loss is their NLL over all their reply tokens."""
        batches = [[self.examples[i] for i in self._indices(self.step * self.options.gradient_accumulation + k)]
                   for k in range(self.options.gradient_accumulation)]
        tokens = sum(label != IGNORE for batch in batches for example in batch for label in example.labels[1:])
        device = _device(self.model)
        total = 0.0
        for batch in batches:
            nll, _ = _nll_sum(self.model, _collate(batch, device))
            (nll / tokens).backward()
            total += float(nll.detach())
        return total / tokens

    def _indices(self, micro_batch: int) -> list[int]:
        """The examples of a micro-batch: each epoch is its own seeded order cut into batches, the last one
        smaller when the examples do not divide evenly (so that no batch mixes two epochs' length groups)."""
        size, per_epoch = self.options.batch_size, self._batches_per_epoch()
        epoch, batch = divmod(micro_batch, per_epoch)
        if epoch not in self.orders:
            lengths = [len(example.input_ids) for example in self.examples]
            self.orders[epoch] = epoch_order(lengths, self.options.seed, epoch, size, self.options.group_by_length)
        return self.orders[epoch][batch * size:(batch + 1) * size]

    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.options.batch_size)

    def _epoch(self) -> float:
        return self.step * self.options.gradient_accumulation / self._batches_per_epoch()

    def _card(self, interrupted: bool, after: float | None) -> dict[str, Any]:
        return {
            "base": {"name": self.loaded.name, "fingerprint": self.fingerprint},
            "prompt": _prompt_format(self.builder),
            "training": {**dataclasses.asdict(self.options), "steps": self.step, "total_steps": self.total,
                         "interrupted": interrupted, "target_modules": sorted(self.config.target_modules),
                         "train_examples": len(self.examples), "held_out_examples": len(self.held_out),
                         "final_loss": self.losses[-1] if self.losses else None},
            "held_out_perplexity": {"before": self.before, "after": after},
        }

    def _write_card(self, interrupted: bool, after: float | None) -> None:
        folder = self.out_dir / f".card-{os.getpid()}"
        folder.mkdir(exist_ok=True)
        os.replace(write_card(folder, self._card(interrupted, after)), self.out_dir / CARD_NAME)
        folder.rmdir()

    def _save(self, interrupted: bool, after: float | None) -> None:
        """Adapter, card and state into a fresh folder, then each moved into place (the state last): a
        crash leaves every file whole, and the state holds all that resuming needs."""
        import torch
        from peft import get_peft_model_state_dict

        self.out_dir.mkdir(parents=True, exist_ok=True)
        partial = self.out_dir / f".saving-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        with _quiet_peft():
            self.model.save_pretrained(partial)
        write_card(partial, self._card(interrupted, after))
        torch.save({
            "format": STATE_FORMAT, "step": self.step, "losses": list(self.losses),
            "options": dataclasses.asdict(self.options), "base": self.loaded.name, "fingerprint": self.fingerprint,
            "prompt": _prompt_format(self.builder),
            "perplexity_before": self.before, "held_out_digest": _digest(self.held_out),
            "train_digest": _digest(self.examples),
            "trained_hashes": sorted(set(map(_example_hash, self.examples)) | self.earlier_hashes),
            "held_out_hashes": sorted(set(map(_example_hash, self.held_out))),
            "adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.random.get_rng_state(),
        }, partial / STATE_NAME)
        for path in sorted(partial.iterdir(), key=lambda path: path.name == STATE_NAME):
            os.replace(path, self.out_dir / path.name)
        partial.rmdir()


def _read_state(out_dir: Path) -> dict | None:
    import torch

    path = out_dir / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
        log.debug("cannot read %s: %s: %s", path, type(exc).__name__, exc)
        state = None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path} cannot be read as a chatforge training checkpoint (damaged, or from "
                            "another program or version); start a new run in another folder")
    return state


def _check_resumable(state: dict, options: TrainingOptions) -> None:
    saved = state["options"]
    changed = [f"{name} {saved[name]!r} (now {value!r})" for name, value in dataclasses.asdict(options).items()
               if name not in RESUMABLE_CHANGES and saved.get(name) != value]
    if changed:
        raise FinetuneError("the saved run was trained with " + ", ".join(changed) + "; resuming needs the "
                            f"same options (only {', '.join(RESUMABLE_CHANGES)} may change)")


def _prompt_format(builder: PromptBuilder) -> dict[str, Any]:
    """What the card records of the prompts: serving refuses an adapter trained on other ones."""
    return {"chat_template": builder.uses_chat_template, "system_prompt": builder.system_prompt}


def _describe(prompt: dict[str, Any]) -> str:
    kind = "the chat template" if prompt["chat_template"] else "the User:/Bot: transcript"
    return f"{kind}, system prompt {prompt['system_prompt']!r}"


def _newly_held_out_but_trained(state: dict, held_out: Sequence[Example]) -> bool:
    """Whether a held-out example the saved run did not hold out was trained on: its perplexity would flatter.

    One held out from the start may be trained on too (the same "hi" -> "hello" on both sides): it is
    measured the same before and after, so that is allowed.
    """
    new = set(map(_example_hash, held_out)) - set(state["held_out_hashes"])
    return bool(new & set(state["trained_hashes"]))


def _example_hash(example: Example) -> str:
    return hashlib.sha256(json.dumps([example.input_ids, example.labels]).encode()).hexdigest()[:16]


def _digest(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:16]


def _has_lora(model: Any) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft calls a transformers property that warns it is deprecated, on every model it wraps or saves."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class _Interrupts:
    """Ctrl-C during training: the first ends it after the current step, a second at once.

    Updates (with their progress report) and saves are never cut: a Ctrl-C during one is acted on after
    it. Off the main thread, where Python delivers no signals, nothing is installed and KeyboardInterrupt
    (from a callback) still works.
    """

    def __init__(self) -> None:
        self.requested = False
        self._mode = "after-step"
        self._pending = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._mode == "immediate":
            raise KeyboardInterrupt
        first = not self.requested
        self.requested = True
        if self._mode == "deferred":
            self._pending = self._pending or not first
        elif not first:
            raise KeyboardInterrupt
        if first:
            print("\nchatforge: stopping after this step and saving (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self, raise_after: bool = True) -> Iterator[None]:
        previous, self._mode = self._mode, "deferred"
        try:
            yield
        finally:
            self._mode = previous
        if self._pending and raise_after:
            self._pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        previous, self._mode = self._mode, "immediate"
        try:
            yield
        finally:
            self._mode = previous

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
