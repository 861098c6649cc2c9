"""The `chatforge` command: chat, run, plugins, finetune, config check."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .adapter import AdapterError
from .app import AdapterStopped
from .config import ConfigError, ConfigIssue, Settings, UsageError, find_config_file, load_settings
from .local.model_loading import ModelLoadError  # torch-free: the local model's load failure
from .plugin_manager import PluginError
from .redaction import REDACTOR, install as install_redaction

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $CHATFORGE_CONFIG, else ./config.yaml, else built-in defaults)")
    common.add_argument("--strict", action="store_true", default=argparse.SUPPRESS,
                        help="make plugin failures fatal (for plugin authors)")
    common.add_argument("--verbose", "-v", action="count", default=argparse.SUPPRESS,
                        help="log more (-v info, -vv debug)")

    parser = argparse.ArgumentParser(prog="chatforge", parents=[common],
                                     description="A chat bot on a local language model, with pluggable skills and platforms.")
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chat = commands.add_parser("chat", parents=[common], help="chat in this terminal (or through a pipe)",
                               description="Chat with the bot in the terminal. With a pipe on stdin, "
                                           "each line is one message.")
    chat.add_argument("--json", action="store_true",
                      help='one JSON object per input line: {"input": ..., "reply": ..., "source": ...}')
    chat.add_argument("--user", metavar="NAME", help="talk as NAME (its own memory), e.g. for a script")
    run = commands.add_parser("run", parents=[common], help="serve on the adapters enabled in the config",
                              description="Start every adapter enabled in the config (or those named) around one engine.")
    run.add_argument("--adapter", "-a", action="append", metavar="NAME", help="start this adapter (repeatable)")
    commands.add_parser("plugins", parents=[common], help="list plugins, their hooks, commands and errors",
                        description="List every plugin found, where it came from, its hooks and commands, and load errors.")
    scaffold = commands.add_parser("new-plugin", help="create a plugin package to start from",
                                   description="Create an installable plugin package with one command, "
                                               "one free-text handler, a README and tests that pass as generated.")
    scaffold.add_argument("name", metavar="NAME", help="plugin and command name, e.g. dice")
    scaffold.add_argument("--dir", metavar="PATH", default=".", help="where to create the NAME folder (default: here)")
    finetune = commands.add_parser("finetune", parents=[common], help="teach the local model from dialogues (LoRA)",
                                   description="Fine-tune the configured local model with a LoRA adapter on "
                                               "dialogues from a JSONL file, the bot's memory or a corpus; "
                                               "report held-out perplexity before and after.")
    from .finetune_command import add_arguments

    add_arguments(finetune)
    config = commands.add_parser("config", help="config file tools", description="Config file tools.")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    config_commands.add_parser("check", parents=[common], help="validate a config file and say where it is wrong",
                               description="Validate the config file, including each plugin's section.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0) or 0
    strict = getattr(args, "strict", False)
    if args.command == "new-plugin":
        return new_plugin(args.name, Path(args.dir))
    try:
        settings = load_settings(find_config_file(getattr(args, "config", None)))
        configure_logging(settings, verbose)
        if args.command == "config":
            return check_config(settings, strict)
        if args.command == "plugins":
            return list_plugins(settings, strict)
        if args.command == "finetune":
            from .finetune_command import run as finetune

            return finetune(settings, args)
        if args.command == "chat":
            console = {"output": "json"} if args.json else {}
            if args.user:
                console["user"] = args.user
            return serve(settings, strict, ["console"], overrides={"console": console})
        return serve(settings, strict, args.adapter)
    except ConfigError as exc:
        if args.command == "config" and exc.settings is not None:
            # The core sections are wrong: check the plugins' and adapters' too, to report everything at once.
            configure_logging(exc.settings, verbose)
            return check_config(exc.settings, strict, exc.issues)
        print(f"chatforge: invalid config:\n{REDACTOR.redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print("\n".join(f"chatforge: {line}" for line in str(exc).splitlines()), file=sys.stderr)
        return EXIT_CONFIG
    except AdapterError as exc:
        print(f"chatforge: {REDACTOR.redact(str(exc))} (in {settings.filename})", file=sys.stderr)
        return EXIT_CONFIG
    except (PluginError, ModelLoadError, AdapterStopped) as exc:
        print(f"chatforge: {REDACTOR.redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def new_plugin(name: str, parent: Path) -> int:
    from .scaffold import ScaffoldError, create_plugin

    try:
        folder = create_plugin(name, parent)
    except ScaffoldError as exc:
        print(f"chatforge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"Created {folder}. Next:\n"
          f"  pip install -e {folder}\n"
          f"  pytest {folder}\n"
          f"  chatforge chat     # then type /{folder.name}")
    return EXIT_OK


def configure_logging(settings: Settings, verbose: int) -> None:
    level = {0: settings.logging.level, 1: "INFO"}.get(verbose, "DEBUG")
    logging.basicConfig(level=level, format="%(name)s: %(levelname)s: %(message)s", stream=sys.stderr)
    install_redaction()
    # transformers and huggingface_hub are chatty at INFO; keep them to real problems.
    for noisy in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_config(settings: Settings, strict: bool, found: Sequence[ConfigIssue] = ()) -> int:
    """Report every problem at once, in the order of the file: `found` (the core sections', from
    load_settings), the plugins' and adapters' sections', and a missing token of an enabled adapter.

    A check never stops at the first plugin failure, `strict` or not: each is logged, and any fails it.
    """
    from .app import check_tokens
    from .plugin_manager import PluginHost

    host = PluginHost(settings)
    issues = [*found, *host.load()]
    try:
        check_tokens(settings, host, [name for name, section in settings.adapters.items() if section.enabled])
    except ConfigError as exc:
        issues += exc.issues
    if issues:
        error = ConfigError(issues, settings.filename)
        print(f"chatforge: invalid config:\n{REDACTOR.redact(str(error))}", file=sys.stderr)
    failed = [info.name for info in host.failures]
    if failed:
        sections = ", ".join(f"plugins.{name}" for name in failed)
        print(f"{settings.filename}: not OK: {len(failed)} plugin(s) failed to load (see above), "
              f"so {sections} could not be checked", file=sys.stderr)
    if issues or failed:
        return EXIT_CONFIG if issues else EXIT_FAILURE
    problem = memory_file_problem(settings, host)
    if problem:
        print(f"chatforge: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{settings.filename}: OK")
    return EXIT_OK


def memory_file_problem(settings: Settings, host) -> str | None:
    """What is wrong with the sqlite memory file, if one exists: a check opens it as a start would (and so
    upgrades an older schema), but creates none. A server-backed store is not contacted by a check."""
    from .app import create_memory

    if settings.memory.backend != "sqlite" or host.memory_config is None:
        return None
    if not settings.resolve_path(host.memory_config.path).exists():
        return None
    try:
        create_memory(settings, host).close()
    except UsageError as exc:
        return str(exc)
    return None


def list_plugins(settings: Settings, strict: bool) -> int:
    from .plugin_manager import PluginHost

    host = PluginHost(settings, strict=strict)
    issues = host.load()
    for name, info in sorted(host.infos.items()):
        origin = info.location
        if info.distribution:
            origin = f"{info.distribution} {info.version} ({info.location})"
        print(f"{name}  [{info.source}: {origin}]")
        print(f"  enabled:  {'yes' if info.enabled else 'no'}")
        print(f"  hooks:    {', '.join(info.hooks) or '-'}")
        prefix = settings.bot.command_prefix
        print(f"  commands: {', '.join(prefix + c for c in info.commands) or '-'}")
        if info.adapters:
            print(f"  adapters: {', '.join(info.adapters)}")
        if info.generators:
            chosen = settings.generator.backend
            print(f"  generator backends: {', '.join(n + (' (chosen)' if n == chosen else '') for n in info.generators)}")
            if chosen in info.generators and getattr(settings.generator, "adapter", None):
                print(f"  adapter:  {_adapter_line(settings)}")
        if info.memory_backends:
            chosen = settings.memory.backend
            print(f"  memory backends: {', '.join(n + (' (chosen)' if n == chosen else '') for n in info.memory_backends)}")
        for error in info.errors:
            print(f"  error:    {error}")
    for issue in issues:
        print(f"config: {issue.format(settings.filename)}", file=sys.stderr)
    return EXIT_OK


def _adapter_line(settings: Settings) -> str:
    """`generator.adapter` as `chatforge plugins` shows it: read from its folder and card, the model not loaded."""
    from .local.lora import AdapterError, read_adapter  # torch-free

    path = settings.resolve_path(settings.generator.adapter)
    try:
        return read_adapter(path).describe()
    except AdapterError as exc:
        return f"cannot be served: {exc}"


def serve(settings: Settings, strict: bool, adapter_names: list[str] | None,
          overrides: dict[str, dict[str, object]] | None = None) -> int:
    """Start the adapters; `overrides` are command-line options that win over their config sections."""
    from . import app

    host = app.load_plugins(settings, strict)
    for name, changes in (overrides or {}).items():
        if changes and host.adapter_configs.get(name) is not None:
            host.adapter_configs[name] = host.adapter_configs[name].model_copy(update=changes)
    names = app.choose_adapters(settings, host, adapter_names)
    app.check_tokens(settings, host, names)  # before the model loads
    engine = app.create_engine(settings, host)
    asyncio.run(app.serve(engine, names))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
