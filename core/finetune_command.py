"""`chatforge finetune`: teach the configured local model from dialogues, with a LoRA adapter.

    chatforge finetune --data chats.jsonl --out adapters/support
    chatforge finetune --from-memory --platform telegram --out adapters/ours --max-steps 200
    chatforge finetune --corpus chitchat --limit 500 --out adapters/chitchat
    chatforge finetune --eval-only --adapter adapters/support --data chats.jsonl

It joins the two halves: the dialogues (chatforge.finetune_data, no torch) and
the training (chatforge.local.finetune), built with the generator's own prompt
builder for this config, so the model learns on the prompts it will be given.
It prints held-out perplexity before and after and a few replies side by side;
then `generator.adapter: OUT` serves the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from .config import Settings
from .finetune_data import DataError, Dialogue, dialogue_corpora, from_memory, read_jsonl, split_held_out
from .memory import trim_step

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (at least one)")
    data.add_argument("--data", action="append", metavar="FILE.jsonl", default=[],
                      help='dialogues, one a line: {"messages": [{"role", "content"}...]} or {"prompt", "response"}')
    data.add_argument("--from-memory", action="store_true", help="the bot's own conversations (memory.* in the config)")
    data.add_argument("--platform", metavar="NAME", help="with --from-memory: only this platform's (e.g. telegram)")
    data.add_argument("--chat", metavar="ID", help="with --from-memory: only this chat's")
    data.add_argument("--corpus", action="append", metavar="NAME", default=[],
                      help="a dialogue corpus a plugin registers (built in: chitchat)")
    data.add_argument("--limit", type=int, metavar="N", help="with --corpus: its first N dialogues")
    training = parser.add_argument_group(
        "training", "Left unset, an option is the saved run's with --resume, else the default shown.")
    training.add_argument("--out", metavar="DIR", help="where the adapter goes (a new folder, or the one to --resume)")
    training.add_argument("--resume", action="store_true", help="go on with the run saved in --out")
    training.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: --epochs)")
    training.add_argument("--epochs", type=float, metavar="E", help="passes over the data (default 1)")
    training.add_argument("--learning-rate", type=float, metavar="LR", help="default 2e-4")
    training.add_argument("--warmup-steps", type=int, metavar="N",
                          help="steps the rate rises over, at most a tenth of the run (default 10)")
    training.add_argument("--lora-r", type=int, metavar="R", help="LoRA rank (default 8)")
    training.add_argument("--lora-alpha", type=int, metavar="A", help="LoRA alpha (default 16)")
    training.add_argument("--lora-dropout", type=float, metavar="P", help="default 0.05")
    training.add_argument("--batch-size", type=int, metavar="N", help="examples per micro-batch (default 4)")
    training.add_argument("--gradient-accumulation", type=int, metavar="N",
                          help="micro-batches per step (default 1)")
    training.add_argument("--max-seq-length", type=int, metavar="TOKENS",
                          help="longest example; a longer one loses its oldest history first (default: the "
                               "generator's context window, so nothing is cut that the bot would see)")
    training.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                          help="batch replies of similar length together, padding less (default: on)")
    training.add_argument("--seed", type=int, help="default 0")
    training.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default 50)")
    run_options = parser.add_argument_group("measuring and running")
    run_options.add_argument("--val-split", type=float, metavar="F",
                             help="share of the dialogues held out to measure perplexity (default 0.1)")
    run_options.add_argument("--eval-replies", type=int, metavar="N",
                             help="held-out replies measured, at most, spread over the held-out dialogues "
                                  "(default 200)")
    run_options.add_argument("--samples", type=int, default=3, metavar="N",
                             help="held-out messages answered before and after, side by side (default 3)")
    run_options.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all the cores)")
    run_options.add_argument("--eval-only", action="store_true",
                             help="train nothing: measure the base and --adapter (default: generator.adapter) "
                                  "on all the data given")
    run_options.add_argument("--adapter", metavar="DIR", help="with --eval-only: the adapter to measure")


TRAINING_OPTIONS = ("max_steps", "epochs", "learning_rate", "warmup_steps", "lora_r", "lora_alpha", "lora_dropout",
                    "batch_size", "gradient_accumulation", "max_seq_length", "group_by_length", "seed", "save_every",
                    "val_split", "eval_replies")
"""The TrainingOptions the command line sets (same names, with dashes). eval_replies defaults to 200: measuring
all 776 replies of 30 held-out chitchat conversations took SmolLM2 over 15 minutes on 2 cores."""


def run(settings: Settings, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The command: exit 0 when trained (or measured), 2 for bad data or options, 1 when something fails,
    130 when Ctrl-C stopped it; each failure one line, never a traceback. Output goes to stdout, progress
    and messages to stderr (as they are when called, not when this module was imported)."""
    out, err = out or sys.stdout, err or sys.stderr
    from .local.finetune import FinetuneError
    from .local.model_loading import ModelLoadError

    progress = _Progress()
    try:
        problem = _usage_problem(settings, args)
        if problem:
            raise FinetuneError(problem)
        options = _options(args)  # checked before any data is read or model loaded
        train_dialogues, held_out_dialogues = _split(settings, args, options, err)
        return _train(settings, args, options, train_dialogues, held_out_dialogues, out, err, progress)
    except (FinetuneError, DataError) as exc:
        print(f"chatforge finetune: {exc}", file=err)
        return EXIT_USAGE
    except ModelLoadError as exc:
        print(f"chatforge finetune: {exc}", file=err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"chatforge finetune: stopped (Ctrl-C); {progress.saved_state()}", file=err)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - out of memory, a full disk, a database down: one line
        import logging

        logging.getLogger("chatforge.finetune").debug("fine-tuning failed", exc_info=True)
        print(f"chatforge finetune: {progress.phase} failed: {type(exc).__name__}: {exc} (-vv shows where)",
              file=err)
        return EXIT_FAILURE


class _Progress:
    """How far the command got, for what to say when it is stopped."""

    def __init__(self) -> None:
        self.out_dir: Path | None = None
        self.phase = "reading the data"
        self.finished = False

    def saved_state(self) -> str:
        from .local.finetune import STATE_NAME

        if self.out_dir is None or not (self.out_dir / STATE_NAME).is_file():
            return "nothing was trained or saved"
        if self.finished:
            return f"training had finished: the adapter in {self.out_dir} is complete"
        return f"the adapter in {self.out_dir} is saved: serve it, or go on with --resume --out {self.out_dir}"


def _usage_problem(settings: Settings, args: argparse.Namespace) -> str | None:
    from .local.adapter_card import CARD_NAME
    from .local.finetune import STATE_NAME

    if settings.generator.backend != "transformers":
        return (f"fine-tuning trains the local model, but generator.backend is {settings.generator.backend!r}; "
                "set generator.backend: transformers (and generator.model) to fine-tune")
    if not (args.data or args.from_memory or args.corpus):
        return "no data: give --data FILE.jsonl, --from-memory or --corpus NAME (any of them, several at once)"
    if (args.platform or args.chat) and not args.from_memory:
        return "--platform and --chat choose conversations from memory: add --from-memory"
    if args.limit is not None and not args.corpus:
        return "--limit takes the first N dialogues of a --corpus: add --corpus NAME"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1, not {args.limit}"
    if args.samples < 0:
        return f"--samples must be 0 or more, not {args.samples}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, not {args.threads}"
    if args.eval_only:
        if not (args.adapter or settings.generator.adapter):
            return "--eval-only measures an adapter: give --adapter DIR (or set generator.adapter)"
        if args.resume or args.out:
            return "--eval-only trains nothing: leave out --resume and --out"
        return None
    if args.adapter:
        return "--adapter names the adapter --eval-only measures; to train, give --out DIR"
    if not args.out:
        return "--out DIR is needed: the folder the adapter is written to"
    out_dir = Path(args.out)
    if args.resume and not (out_dir / STATE_NAME).is_file():
        return f"nothing to resume in {out_dir}: it has no {STATE_NAME} (start without --resume)"
    if not args.resume and ((out_dir / STATE_NAME).is_file() or (out_dir / CARD_NAME).is_file()):
        return f"{out_dir} already holds an adapter; choose another --out folder, or go on with --resume"
    return None


def _split(settings: Settings, args: argparse.Namespace, options: Any, err: TextIO
           ) -> tuple[list[Dialogue], list[Dialogue]]:
    """(to train on, held out); with --eval-only, every dialogue is measured."""
    from .plugin_manager import PluginHost

    host = PluginHost(settings)
    host.load()
    dialogues = _dialogues(settings, host, args, err)
    if args.eval_only:
        return [], dialogues
    train_dialogues, held_out_dialogues = split_held_out(dialogues, options.val_split, options.seed)
    print(f"chatforge finetune: {len(dialogues)} dialogues, {len(train_dialogues)} to train on, "
          f"{len(held_out_dialogues)} held out", file=err)
    return train_dialogues, held_out_dialogues


def _dialogues(settings: Settings, host: Any, args: argparse.Namespace, err: TextIO) -> list[Dialogue]:
    dialogues: list[Dialogue] = []
    for path in args.data:
        found = read_jsonl(path)
        print(f"chatforge finetune: {path}: {len(found)} dialogues", file=err)
        dialogues += found
    if args.from_memory:
        from .app import create_memory

        store = create_memory(settings, host)
        try:
            found = from_memory(store, settings, platform=args.platform, chat=args.chat)
        finally:
            store.close()
        where = " ".join(part for part in (args.platform, args.chat) if part) or "all platforms"
        print(f"chatforge finetune: memory ({where}): {len(found)} dialogues", file=err)
        dialogues += found
    if args.corpus:
        corpora = dialogue_corpora(host)
        for name in args.corpus:
            if name not in corpora:
                known = ", ".join(sorted(corpora)) or "none"
                raise DataError(f"no corpus named {name!r}; the plugins register: {known}")
            found = corpora[name].load(limit=args.limit)
            print(f"chatforge finetune: corpus {name} ({corpora[name].licence}): {len(found)} dialogues", file=err)
            dialogues += found
    return dialogues


def _options(args: argparse.Namespace) -> Any:
    """The options given; those left out are the saved run's with --resume (so resuming needs no repeats),
    else TrainingOptions' defaults. max_seq_length stays None until the model says its context window."""
    from .local.finetune import TrainingOptions, saved_options

    given = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    if args.epochs is not None and args.max_steps is None:
        given["max_steps"] = None  # --epochs decides the length, even where the saved run had --max-steps
    saved = saved_options(Path(args.out)) if args.resume and args.out else None
    base = {name: getattr(saved, name) for name in TRAINING_OPTIONS} if saved else {"max_seq_length": None}
    return TrainingOptions(**{**base, **given})


def _train(settings: Settings, args: argparse.Namespace, options: Any, train_dialogues: list[Dialogue],
           held_out_dialogues: list[Dialogue], out: TextIO, err: TextIO, progress: _Progress) -> int:
    import dataclasses
    import os

    import torch

    from .local import finetune
    from .local.generator import prompt_builder
    from .local.model_loading import load_model

    config = settings.generator
    progress.phase = "measuring the model"
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    loaded = load_model(config.model, settings.resolve_path(config.cache_dir), fallback=config.fallback)
    builder = prompt_builder(loaded, config, history_tokens=settings.memory.max_tokens,
                             trim_turns=trim_step(settings.memory.max_turns))
    if options.max_seq_length is None:  # the longest prompt and reply the generator makes
        options = dataclasses.replace(options, max_seq_length=builder.prompt_budget + config.max_new_tokens)
    examples = finetune.build_examples(train_dialogues, builder, loaded.tokenizer, options.max_seq_length,
                                       max_turns=settings.memory.max_turns)
    held_out = finetune.build_examples(held_out_dialogues, builder, loaded.tokenizer, options.max_seq_length,
                                       max_turns=settings.memory.max_turns)
    measured = finetune.spread(held_out, options.eval_replies)
    sampled = f" ({len(measured)} of them measured: --eval-replies)" if len(measured) < len(held_out) else ""
    if args.eval_only:
        print(f"chatforge finetune: {len(held_out)} replies{sampled}", file=err)
    else:
        print(f"chatforge finetune: {len(examples)} replies to learn, {len(held_out)} held out{sampled}", file=err)
    for note in _notes(examples, held_out, options.max_seq_length):
        print(f"chatforge finetune: {note}", file=err)
    prompts = finetune.sample_prompts(held_out_dialogues, args.samples)
    before = finetune.sample_replies(loaded.model, builder, loaded.tokenizer, prompts, config.max_new_tokens)
    if args.eval_only:
        return _evaluate(settings, args, options, loaded, builder, measured, prompts, before, out)

    progress.out_dir, progress.phase = Path(args.out), "training"
    with _ProgressBar(err) as bar:
        report = finetune.train(loaded, builder, examples, measured, options, Path(args.out), resume=args.resume,
                                on_progress=bar.update)
    progress.finished = not report.interrupted
    after = finetune.sample_replies(report.model, builder, loaded.tokenizer, prompts, config.max_new_tokens)
    state = "interrupted; a usable checkpoint is saved" if report.interrupted else "done"
    print(f"Training {state}: {report.steps_done} of {report.total_steps} steps in {report.seconds:.0f} s "
          f"({report.seconds_per_step:.2f} s a step).", file=out)
    _print_perplexity(report.perplexity_before, report.perplexity_after, out)
    _print_samples(prompts, before, after, out)
    print(f"Adapter: {report.out_dir}. Serve it with generator.adapter: {_config_path(settings, report.out_dir)}"
          + (f"; go on with --resume --out {report.out_dir}" if report.interrupted else ""), file=out)
    return EXIT_INTERRUPTED if report.interrupted else EXIT_OK


def _notes(examples: Any, held_out: Any, max_seq_length: int) -> list[str]:
    """What became of the replies that did not fit as they were, and system prompts not used."""
    notes = []
    shortened, dropped = examples.shortened + held_out.shortened, examples.too_long + held_out.too_long
    if shortened:
        notes.append(f"{shortened} replies had their oldest history cut to fit --max-seq-length {max_seq_length}")
    if dropped:
        notes.append(f"{dropped} replies longer than --max-seq-length {max_seq_length} on their own left out")
    own = examples.own_system + held_out.own_system
    if own:
        notes.append(f"{own} dialogues have a system prompt of their own; they are trained with "
                     "generator.system_prompt instead, the one the bot answers with")
    return notes


def _config_path(settings: Settings, folder: Path) -> str:
    """The folder as generator.adapter names it: relative to the config file's folder where it is inside."""
    folder = folder.absolute()
    base = settings.source.absolute().parent if settings.source is not None else Path.cwd()
    try:
        relative = folder.relative_to(base)
    except ValueError:
        return str(folder)
    return str(relative) if settings.resolve_path(str(relative)).resolve() == folder.resolve() else str(folder)


def _evaluate(settings: Settings, args: argparse.Namespace, options: Any, loaded: Any, builder: Any, held_out: Any,
              prompts: list, before: list[str], out: TextIO) -> int:
    """--eval-only: the base, then the adapter merged in, on the same replies (all the data given)."""
    from .local import finetune, lora

    path = Path(args.adapter) if args.adapter else settings.resolve_path(settings.generator.adapter)
    perplexity_before = finetune.held_out_perplexity(loaded.model, held_out, options.batch_size) if held_out else None
    try:
        adapter = lora.load_adapter(loaded, path)
    except lora.AdapterError as exc:
        raise finetune.FinetuneError(f"--adapter: {exc}") from None
    perplexity_after = finetune.held_out_perplexity(loaded.model, held_out, options.batch_size) if held_out else None
    after = finetune.sample_replies(loaded.model, builder, loaded.tokenizer, prompts, settings.generator.max_new_tokens)
    print(f"Adapter {adapter.describe()}", file=out)
    _print_perplexity(perplexity_before, perplexity_after, out)
    _print_samples(prompts, before, after, out)
    return EXIT_OK


def _print_perplexity(before: float | None, after: float | None, out: TextIO) -> None:
    if before is None or after is None:
        print("Held-out perplexity: not measured (no held-out replies)", file=out)
        return
    print(f"Held-out perplexity of the replies: {before:.2f} before, {after:.2f} after "
          f"({after / before:.2f}x)", file=out)


def _print_samples(prompts: list, before: list[str], after: list[str], out: TextIO) -> None:
    def lines(text: str) -> str:  # a message of several lines stays in its column
        return text.replace("\n", "\n" + " " * 13)

    for prompt, old, new in zip(prompts, before, after):
        print(f"\n  user:      {lines(prompt.text)}\n  data says: {lines(prompt.reference)}\n"
              f"  before:    {lines(old)}\n  after:     {lines(new)}", file=out)
    if prompts:
        print(file=out)


class _ProgressBar:
    """tqdm's bar on stderr: step, seconds a step and time left (tqdm's), loss and rate (tqdm comes with
    transformers)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None

    def __enter__(self) -> "_ProgressBar":
        return self

    def update(self, info: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=info.total_steps, initial=info.step - 1, file=self.stream, unit="step",
                            dynamic_ncols=True, mininterval=0.5)
        self.bar.n = info.step
        self.bar.set_postfix_str(f"loss {info.loss:.3f}, lr {info.learning_rate:.1e}", refresh=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
