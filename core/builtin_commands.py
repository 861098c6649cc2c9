"""The commands every chatforge bot has: /help, /history and /reset.

They are an ordinary plugin (named "core"), registered through the same hook
as any third-party command.
"""

from __future__ import annotations

from .commands import CommandContext
from .hookspecs import hookimpl


def help_command(ctx: CommandContext) -> str:
    prefix = ctx.bot.command_prefix
    lines = ["Commands:"]
    lines += [f"{command.signature(prefix)} - {command.help}" for command in ctx.bot.commands]
    lines.append("Anything else is answered by the language model.")
    return "\n".join(lines)


def history_command(ctx: CommandContext) -> str:
    turns = ctx.bot.history(ctx.message)
    if not turns:
        return "I don't remember anything of this conversation yet."
    lines = [f"I remember {len(turns)} turn{'s' if len(turns) != 1 else ''} of this conversation:"]
    for turn in turns:
        speaker = "You" if turn.role == "user" else ctx.bot.name
        lines.append(f"{speaker}: {turn.text}")
    return "\n".join(lines)


def reset_command(ctx: CommandContext) -> str:
    forgotten = ctx.bot.forget(ctx.message)
    if not forgotten:
        return "There was nothing to forget: this conversation is already empty."
    return f"Done: I forgot this conversation ({forgotten} turn{'s' if forgotten != 1 else ''})."


@hookimpl
def chatforge_register_commands(register) -> None:
    register("help", help_command, help="list the commands")
    register("history", history_command, help="show what I remember of this conversation")
    register("reset", reset_command, help="forget this conversation")
