"""The commands every chatforge bot has: /help, /history, /reset, /forget, and /stats for admins.

They are an ordinary plugin (named "core"), registered through the same hook
as any third-party command.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

from .commands import CommandContext
from .hookspecs import hookimpl
from .skill import SkillError

log = logging.getLogger("chatforge.memory")

UNREACHABLE = "I can't reach my memory right now, so I can't do that; please try again in a minute."


def _uses_memory(command: Callable[[CommandContext], str]) -> Callable[[CommandContext], str]:
    """A store that fails (a database down) is the memory's fault, not the command's: say so to the user."""
    @functools.wraps(command)
    def guarded(ctx: CommandContext) -> str:
        try:
            return command(ctx)
        except SkillError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("memory: %s%s failed: %s: %s", ctx.bot.command_prefix, command.__name__.removesuffix(
                "_command"), type(exc).__name__, exc)
            raise SkillError(UNREACHABLE) from exc
    return guarded


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def help_command(ctx: CommandContext) -> str:
    prefix, admin = ctx.bot.command_prefix, ctx.bot.is_admin(ctx.message)
    lines = ["Commands:"]
    lines += [f"{command.signature(prefix)} - {command.help}" + (" (admins)" if command.admin else "")
              for command in ctx.bot.commands if admin or not command.admin]
    lines.append("Anything else is answered by the language model.")
    return "\n".join(lines)


def _speaker(ctx: CommandContext, turn) -> str:
    """Who said a line: "You", another member of a shared conversation by name, or the bot."""
    if turn.role == "assistant":
        return ctx.bot.name
    if not turn.user or turn.user == ctx.message.user:
        return "You"
    return turn.display_name or turn.user


@_uses_memory
def history_command(ctx: CommandContext) -> str:
    if ctx.args.strip().lower() == "all":
        return _everything(ctx)
    turns = ctx.bot.history(ctx.message)
    if not turns:
        lines = ["I don't remember anything of this conversation yet."]
    else:
        lines = [f"I remember {_plural(len(turns), 'turn')} of this conversation:"]
        lines += [f"{_speaker(ctx, turn)}: {turn.text}" for turn in turns]
    here = ctx.bot.conversation(ctx.message)
    try:
        elsewhere = {key for key, _ in ctx.bot.about_user(ctx.message) if key != here}
    except Exception:  # noqa: BLE001 - a damaged page elsewhere in the file (warned at start) must not hide this one
        elsewhere = set()
    if elsewhere:
        lines.append(f"I also keep turns of yours from {_plural(len(elsewhere), 'other chat')}: "
                     f"{ctx.bot.command_prefix}history all shows everything.")
    return "\n".join(lines)


def _everything(ctx: CommandContext) -> str:
    kept = ctx.bot.about_user(ctx.message)
    if not kept:
        return f"I keep nothing about you on {ctx.message.platform}."
    lines = [f"Everything I keep about you on {ctx.message.platform} ({_plural(len(kept), 'turn')}):"]
    current = None
    for key, turn in kept:
        if key != current:
            current = key
            lines.append(f"[chat {key.chat}{f', thread {key.thread}' if key.thread else ''}]")
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(turn.created_at))
        lines.append(f"{when} {_speaker(ctx, turn)}: {turn.text}")
    lines.append(f"{ctx.bot.command_prefix}forget deletes all of it.")
    return "\n".join(lines)


@_uses_memory
def reset_command(ctx: CommandContext) -> str:
    """Forget the conversation; in a group's shared one, a member forgets only their own part of it."""
    bot, message = ctx.bot, ctx.message
    if bot.shared(message) and not bot.is_admin(message):
        forgotten = bot.forget(message, only_sender=True)
        if not forgotten:
            return "There was nothing of yours to forget in this shared conversation."
        return (f"Done: I forgot your {_plural(forgotten, 'turn')} of this shared conversation; other people's "
                f"turns stay (an admin's {bot.command_prefix}reset clears it for everyone).")
    forgotten = bot.forget(message)
    if not forgotten:
        return "There was nothing to forget: this conversation is already empty."
    if bot.shared(message):
        return f"Done: I forgot this shared conversation for everyone ({_plural(forgotten, 'turn')})."
    return f"Done: I forgot this conversation ({_plural(forgotten, 'turn')})."


@_uses_memory
def forget_command(ctx: CommandContext) -> str:
    forgotten = ctx.bot.forget_user(ctx.message)
    if not forgotten:
        return f"I keep nothing about you on {ctx.message.platform}."
    return f"Done: I deleted everything I kept about you on {ctx.message.platform} ({_plural(forgotten, 'turn')})."


def stats_command(ctx: CommandContext) -> str:
    bot = ctx.bot
    uptime = int(time.time() - bot.started_at)
    failures = [info.name for info in bot.host.failures]
    lines = [
        f"Up {uptime // 3600} h {uptime % 3600 // 60} min; answered {_plural(bot.answered, 'message')}.",
        f"Waiting or in progress: {bot.queue.pending} of at most {bot.settings.limits.max_pending}.",
        f"Model: {getattr(bot.generator, 'name', '?')}.",
    ]
    adapter = getattr(bot.generator, "adapter", None)  # the local model's LoRA adapter (generator.adapter)
    if adapter is not None:
        lines.append(f"Adapter: {adapter.describe()}.")
    last = _last_generation(bot.generator)
    if last:
        lines.append(last)
    lines.append(f"Plugins with errors: {', '.join(failures) if failures else 'none'}.")
    return "\n".join(lines)


def _last_generation(generator) -> str:
    """Tokens and latency of the generator's last reply, where it measures them (both built-in backends do)."""
    last = getattr(generator, "last_stats", None)
    new, prompt = getattr(last, "new_tokens", None), getattr(last, "prompt_tokens", None)
    if last is None or new is None:
        return ""
    prompt_part = f" to a {prompt}-token prompt" if prompt is not None else ""
    total = getattr(generator, "generated_tokens", None)
    since = f"; {total} tokens since start" if isinstance(total, int) else ""
    return f"Last reply: {new} tokens{prompt_part} in {last.seconds:.2f} s{since}."


@hookimpl
def chatforge_register_commands(register) -> None:
    register("help", help_command, help="list the commands")
    register("history", history_command, help="show what I remember of this conversation", usage="[all]")
    register("reset", reset_command, help="forget this conversation")
    register("forget", forget_command, help="delete everything I keep about you")
    register("stats", stats_command, help="uptime, load and plugin errors", admin=True)
