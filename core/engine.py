"""The dialogue engine: routes one message to the right answer.

Order: pre-processing hooks, then a command (`/name args`), then the first
skill that claims the free text, then the generator with the conversation's
memory; post-processing hooks see the reply last, and memory records the
turn. A failure anywhere becomes a short apology and a log line naming its
source; the engine itself never raises out of `handle`.

The engine is also what plugins receive as `bot`: it gives them the
generator, the conversation memory and the command list.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import time
from typing import Any

from .commands import CommandContext, CommandRegistry, parse_command
from .config import Settings
from .generator import OnText, TextGenerator
from .memory import MemoryStore, Turn, conversation_key
from .message import Message, Reply
from .plugin_manager import PluginHost
from .skill import SkillError

log = logging.getLogger("chatforge.engine")


_FAILED = object()


def apology(source: str) -> Reply:
    return Reply(f"Sorry, something went wrong while answering ({source} failed). Please try again.",
                 source=source, remember=False)


class Engine:
    def __init__(self, settings: Settings, host: PluginHost, generator: TextGenerator, memory: MemoryStore) -> None:
        self.settings = settings
        self.host = host
        self.generator = generator
        self.memory = memory

    # ------------------------------------------------------------ for plugins

    @property
    def name(self) -> str:
        return self.settings.bot.name

    @property
    def command_prefix(self) -> str:
        return self.settings.bot.command_prefix

    @property
    def commands(self) -> CommandRegistry:
        return self.host.commands

    def conversation(self, message: Message) -> str:
        """The memory key of the conversation `message` belongs to."""
        return conversation_key(message, self.settings.memory.scope)

    def history(self, message: Message) -> list[Turn]:
        """What the bot remembers of the conversation, oldest first (at most `memory.max_turns`)."""
        return self.memory.recent(self.conversation(message), self.settings.memory.max_turns)

    def forget(self, message: Message) -> int:
        """Forget the conversation; returns how many turns were deleted."""
        return self.memory.forget(self.conversation(message))

    async def generate(self, instruction: str, max_new_tokens: int | None = None) -> str:
        """Ask the language model a one-off question, outside any conversation."""
        return await self.generator.complete(instruction, max_new_tokens)

    # ------------------------------------------------------------ routing

    async def handle(self, message: Message, on_text: OnText | None = None) -> Reply | None:
        """Answer one message. None means a deliberate silence (for example, an empty message)."""
        text = message.text.strip()
        if not text:
            return None
        try:
            reply = await self._answer(message.replace(text=text), on_text)
        except Exception:  # noqa: BLE001 - a bug in chatforge must not kill the bot either
            log.exception("engine failed on a message from %s/%s", message.platform, message.chat)
            return apology("chatforge")
        return reply if reply else None

    async def _answer(self, message: Message, on_text: OnText | None) -> Reply:
        try:
            return await self._route(message, on_text)
        except SkillError as refusal:  # a plugin's message for the user, not a fault
            return Reply(str(refusal), source="plugin", remember=False)

    async def _route(self, message: Message, on_text: OnText | None) -> Reply:
        arguments: dict[str, Any] = {"message": message, "bot": self}
        for plugin, result in self.host.iter_call("chatforge_preprocess", arguments):
            result = await self._settle(plugin, "chatforge_preprocess", result)
            if isinstance(result, Reply):
                return result
            if isinstance(result, Message):
                arguments["message"] = message = result

        parsed = parse_command(message.text, self.command_prefix)
        if parsed is not None:
            reply = await self._run_command(message, *parsed)
        else:
            plugin, claimed = self.host.call_first("chatforge_handle_text", message=message, bot=self)
            if plugin is not None:
                reply = await self._plugin_reply(plugin, claimed, source=plugin, where="chatforge_handle_text",
                                                 remember=True)
            else:
                reply = await self._generate(message, on_text)

        arguments = {"message": message, "reply": reply, "bot": self}
        for plugin, new_text in self.host.iter_call("chatforge_postprocess", arguments):
            new_text = await self._settle(plugin, "chatforge_postprocess", new_text)
            if isinstance(new_text, str):
                reply.text = new_text

        if reply.remember and reply.text:
            self._remember(message, reply)
        return reply

    async def _settle(self, plugin: str, hook_name: str, result: Any, failed: Any = None) -> Any:
        """Await a hook's result if it is awaitable; a failure is reported and gives `failed`."""
        if not inspect.isawaitable(result):
            return result
        try:
            return await result
        except SkillError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.host.report(plugin, hook_name, exc)
            return failed

    async def _run_command(self, message: Message, name: str, args: str) -> Reply:
        command = self.commands.get(name)
        if command is None:
            close = difflib.get_close_matches(name, list(self.commands.commands), n=1)
            hint = f" Did you mean {self.command_prefix}{close[0]}?" if close else ""
            return Reply(f"Unknown command {self.command_prefix}{name}.{hint} "
                         f"Send {self.command_prefix}help for the list.", source="engine", remember=False)
        context = CommandContext(message=message, args=args, bot=self, config=self.host.configs.get(command.plugin))
        try:
            result = command.handler(context)
        except SkillError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.host.report(command.plugin, f"/{name}", exc)
            return apology(f"the {command.plugin} plugin")
        # A command's plain answer is not conversation; a Reply decides for itself.
        return await self._plugin_reply(command.plugin, result, source=f"/{name}", where=f"/{name}", remember=False)

    async def _plugin_reply(self, plugin: str, result: Any, source: str, where: str, remember: bool) -> Reply:
        """Await and normalise what a plugin returned; its failure becomes an apology."""
        result = await self._settle(plugin, where, result, failed=_FAILED)
        if result is _FAILED:
            return apology(f"the {plugin} plugin")
        if isinstance(result, Reply):
            return result
        if result is None:
            return Reply("", source=source, remember=False)
        return Reply(str(result), source=source, remember=remember)

    async def _generate(self, message: Message, on_text: OnText | None) -> Reply:
        try:
            text = await self.generator.reply(self.history(message), message.text, on_text)
        except Exception as exc:  # noqa: BLE001 - includes MemoryError from a too-big model
            log.error("the generator failed: %s: %s", type(exc).__name__, exc)
            log.debug("generator traceback", exc_info=True)
            return apology("the generator")
        if not text:
            text = "…"  # the model produced nothing usable; say something rather than stay silent
        return Reply(text, source="generator")

    def _remember(self, message: Message, reply: Reply) -> None:
        key = self.conversation(message)
        now = time.time()
        try:
            self.memory.add(key, Turn("user", message.text, now, message.user, message.display_name, dict(message.meta)))
            self.memory.add(key, Turn("assistant", reply.text, now, "", self.name))
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the reply
            log.error("could not save the conversation turn: %s: %s", type(exc).__name__, exc)

    async def close(self) -> None:
        """Run shutdown hooks, then release the generator and memory."""
        self.host.call("chatforge_shutdown", bot=self)
        self.generator.close()
        self.memory.close()
