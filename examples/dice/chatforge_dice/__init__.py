"""Dice rolls in standard notation (`2d6+1`), with each person's recent rolls remembered.

An example of a third-party chatforge plugin: config with validation, state
that lives as long as the bot (set up in `chatforge_startup`), a command, a
free-text trigger, and user errors answered with `SkillError`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Optional

from pydantic import Field

from chatforge import CommandContext, Message, PluginConfig, SkillError, hookimpl

NOTATION = re.compile(r"^(?P<count>\d*)d(?P<sides>\d+)(?P<modifier>[+-]\d+)?$", re.IGNORECASE)
FREE_TEXT = re.compile(r"^(?:please\s+)?roll\s+(?P<dice>\d*d\d+(?:[+-]\d+)?)\b", re.IGNORECASE)


class Config(PluginConfig):
    default_sides: int = Field(6, ge=2, le=1000)
    max_dice: int = Field(100, ge=1, le=10000)
    history: int = Field(10, ge=0, le=1000)
    seed: Optional[int] = None


@dataclass(frozen=True)
class Roll:
    notation: str
    dice: list[int]
    modifier: int

    @property
    def total(self) -> int:
        return sum(self.dice) + self.modifier

    def describe(self) -> str:
        if len(self.dice) == 1 and not self.modifier:
            return f"{self.notation}: {self.total}"
        text = " + ".join(str(value) for value in self.dice)
        if self.modifier:
            text += f" {'+' if self.modifier > 0 else '-'} {abs(self.modifier)}"
        return f"{self.notation}: {text} = {self.total}"


class DiceTable:
    """The plugin's state: a random source and each person's recent rolls, per chat."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.random = random.Random(config.seed)
        self.recent: dict[str, deque[Roll]] = defaultdict(lambda: deque(maxlen=config.history))

    def roll(self, notation: str) -> Roll:
        notation = notation.strip() or f"1d{self.config.default_sides}"
        match = NOTATION.match(notation)
        if match is None:
            raise SkillError(f"I can't read {notation!r}. Try 2d6, d20 or 3d8+2.")
        count, sides = int(match["count"] or 1), int(match["sides"])
        if not 1 <= count <= self.config.max_dice:
            raise SkillError(f"I can roll between 1 and {self.config.max_dice} dice at once.")
        if sides < 2:
            raise SkillError("A die needs at least 2 sides.")
        dice = [self.random.randint(1, sides) for _ in range(count)]
        return Roll(f"{count}d{sides}{match['modifier'] or ''}", dice, int(match["modifier"] or 0))


_tables: dict[int, DiceTable] = {}  # one table per running bot


def table_for(bot) -> DiceTable:
    return _tables[id(bot)]


def who(message: Message) -> str:
    return message.display_name or message.user


def record(bot, message: Message, roll: Roll) -> str:
    table_for(bot).recent[bot.conversation(message)].append(roll)
    return f"{who(message)} rolled {roll.describe()}"


def roll_command(ctx: CommandContext) -> str:
    return record(ctx.bot, ctx.message, table_for(ctx.bot).roll(ctx.args))


def rolls_command(ctx: CommandContext) -> str:
    recent = table_for(ctx.bot).recent.get(ctx.bot.conversation(ctx.message), ())
    if not recent:
        return "You haven't rolled anything here yet. Try /roll 2d6."
    return "Your last rolls: " + ", ".join(f"{roll.notation}={roll.total}" for roll in recent)


@hookimpl
def chatforge_config_model():
    return Config


@hookimpl
def chatforge_startup(bot, config: Config):
    _tables[id(bot)] = DiceTable(config)


@hookimpl
def chatforge_shutdown(bot):
    _tables.pop(id(bot), None)


@hookimpl
def chatforge_register_commands(register):
    register("roll", roll_command, help="roll dice, e.g. 2d6+1", usage="[NdS+M]")
    register("rolls", rolls_command, help="your last rolls in this chat")


@hookimpl
def chatforge_handle_text(message: Message, bot):
    match = FREE_TEXT.match(message.text.strip())
    if match is None:
        return None
    return record(bot, message, table_for(bot).roll(match["dice"]))
