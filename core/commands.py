"""Slash commands: what a plugin registers, and how a message is parsed into one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Union

if TYPE_CHECKING:
    from .engine import Engine
    from .message import Message, Reply

CommandResult = Union[str, "Reply", None]
CommandHandler = Callable[["CommandContext"], Union[CommandResult, Awaitable[CommandResult]]]

COMMAND_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass
class CommandContext:
    """Everything a command handler gets: the message, its arguments, the bot, the plugin's config."""

    message: Message
    args: str
    bot: Engine
    config: Any = None


@dataclass
class Command:
    name: str
    handler: CommandHandler
    help: str
    plugin: str
    usage: str = ""
    admin: bool = False
    """Only the users in `bot.admins` may run it."""

    def signature(self, prefix: str = "/") -> str:
        return f"{prefix}{self.name} {self.usage}".rstrip()


@dataclass
class CommandRegistry:
    """Commands by name; the first plugin to claim a name keeps it."""

    commands: dict[str, Command] = field(default_factory=dict)

    def add(self, command: Command) -> None:
        if not COMMAND_NAME.fullmatch(command.name):
            raise ValueError(
                f"invalid command name {command.name!r}: use 1-32 lowercase letters, digits or _"
            )
        if not command.help.strip() or "\n" in command.help.strip():
            raise ValueError(f"command {command.name!r} needs a one-line help text")
        owner = self.commands.get(command.name)
        if owner is not None:
            raise ValueError(f"command /{command.name} is already registered by plugin {owner.plugin!r}")
        self.commands[command.name] = command

    def get(self, name: str) -> Command | None:
        return self.commands.get(name)

    def by_plugin(self, plugin: str) -> list[Command]:
        return [command for command in self.commands.values() if command.plugin == plugin]

    def __iter__(self):
        return iter(sorted(self.commands.values(), key=lambda command: command.name))


def parse_command(text: str, prefix: str = "/") -> tuple[str, str] | None:
    """`"/Name@bot  some args"` -> `("name", "some args")`; None when the text is not a command."""
    if not text.startswith(prefix):
        return None
    match = re.match(r"(\S+)\s*(.*)", text[len(prefix):], re.DOTALL)
    if match is None:
        return None
    name = match.group(1).split("@", 1)[0].lower()  # Telegram appends @botname in groups
    if not name[:1].isalpha():
        return None  # "/ 2" or "/:)" is text, not a command
    return name, match.group(2).strip()
