"""The dialogue engine: routes one message to the right answer.

First the guards (core/guard.py): the text is cleaned, too-long messages and
floods are refused, and the conversation's earlier messages are answered
first. Then: pre-processing hooks, then a command (`/name args`), then the first
skill that claims the free text, then the generator with the conversation's
memory; post-processing hooks see the reply last, and memory records the
turn. A failure anywhere becomes a short apology and a log line naming its
source; the engine itself never raises out of `handle`.

The engine is also what plugins receive as `bot`: it gives them the
generator, the conversation memory and the command list.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import functools
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, ContextManager, Literal, Sequence

from . import pii
from .commands import CommandContext, CommandRegistry, parse_command
from .config import Settings
from .delivery import split_message
from .generation import OnText, TextGenerator
from .guard import ConversationQueue, Notices, Place, RateLimiter, clean_text, too_long
from .conversation import ConversationKey
from .memory import MemoryStore, Turn, window_start
from .message import Message, Reply
from .plugin_manager import FAILED, PluginError, PluginExited, PluginHost, contained
from .skill import SkillError

log = logging.getLogger("chatforge.engine")


BUSY = "I'm busy answering a lot of messages right now; please try again in a minute."
BUSY_RETRY_AFTER = 10.0
"""Seconds an API client is told to wait when every place is taken (a chat is told "a minute")."""


@dataclass
class Admission:
    """What `Engine.admit` decided about an arriving message: a place in the queue, or a refusal.

    Use it as a context manager (or call `release`) to give the place back once the reply is delivered.
    """

    message: Message
    refusal: Reply | None = None
    """The answer to a refused message ("busy", "slow down"...); None for a deliberate silence."""
    place: Place | None = None
    reason: Literal["empty", "too_long", "rate_limited", "busy"] | None = None
    """Why it was refused, for adapters whose protocol has a status for each (HTTP: 400, 429, 503). Set even
    when `refusal` is None: a chat is told "slow down" once a minute, an API client every time."""
    retry_after: float | None = None
    """For "rate_limited" and "busy": seconds after which trying again may succeed."""

    @property
    def admitted(self) -> bool:
        return self.place is not None

    def release(self) -> None:
        if self.place is not None:
            self.place.release()

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def apology(source: str) -> Reply:
    return Reply(f"Sorry, something went wrong while answering ({source} failed). Please try again.",
                 source=source, remember=False)


class Engine:
    def __init__(self, settings: Settings, host: PluginHost, generator: TextGenerator, memory: MemoryStore) -> None:
        self.settings = settings
        self.host = host
        self.generator = generator
        self.memory = memory
        limits = settings.limits
        self.rate_limiter = RateLimiter(limits.rate_per_minute, limits.rate_burst)
        self.queue = ConversationQueue(limits.max_pending)
        self._told_to_wait = Notices()  # users told to slow down
        self._told_busy = Notices()  # conversations told the bot is busy
        self.started_at = time.time()
        self.answered = 0
        self._purged_at = 0.0
        self._forget_listeners: list[Callable[[Message], None]] = []
        self.fatal_error: PluginError | None = None
        self._fatal = asyncio.Event()
        # Memory calls block (a file, a network database): the engine makes them on threads of its own,
        # never on the event loop, and not on the plugins' threads, so a slow store starves neither. As
        # many at once as the store serves (`concurrent_calls`: a pool's size; SQLite serialises anyway).
        # Waiting for a conversation's lock (held by another process) has threads of its own: one per
        # message that may wait, so lock waits can never leave the data calls without a thread.
        self._memory_threads = ThreadPoolExecutor(max_workers=max(1, getattr(memory, "concurrent_calls", 4)),
                                                  thread_name_prefix="chatforge-memory")
        self._lock_threads = ThreadPoolExecutor(max_workers=limits.max_pending + 4,
                                                thread_name_prefix="chatforge-memory-lock")
        self._lock_failures = Notices()
        self.purge_expired()

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

    def conversation(self, message: Message) -> ConversationKey:
        """The memory key of the conversation `message` belongs to."""
        return ConversationKey.of(message, self.settings.memory.scope)

    # Plugin code runs in worker threads, so these memory calls may block there; the engine's own calls go
    # through `_off_loop`.

    def history(self, message: Message) -> list[Turn]:
        """What the bot remembers of the conversation, oldest first (at most `memory.max_turns`)."""
        return self.memory.recent(self.conversation(message), self.settings.memory.max_turns)

    def context(self, message: Message) -> list[Turn]:
        """The turns the model is given: at most `memory.max_turns`, their start moving in steps.

        A window that slid by one exchange each turn would change the prompt's
        start every turn and defeat the cached keys and values; this one keeps
        its start until the conversation outgrows it, then drops half of it.
        """
        key = self.conversation(message)
        total = self.memory.count(key)
        return self.memory.recent(key, total - window_start(total, self.settings.memory.max_turns))

    def shared(self, message: Message) -> bool:
        """Whether the conversation is a group's (`memory.scope: chat` outside a private chat): not the sender's alone."""
        return self.settings.memory.scope == "chat" and not message.direct

    def forget(self, message: Message, only_sender: bool = False) -> int:
        """Forget the conversation, or with `only_sender` just the sender's lines and the replies to them; how many."""
        return self.memory.forget(self.conversation(message), message.user if only_sender else None)

    def about_user(self, message: Message) -> list[tuple[ConversationKey, Turn]]:
        """Everything remembered about the sender on this platform, in every chat."""
        return self.memory.about_user(message.platform, message.user)

    def forget_user(self, message: Message) -> int:
        """Delete everything remembered about the sender on this platform; how many turns.

        Listeners (`on_forget_user`) then delete what they keep of that person too,
        such as the console's line-editing history.
        """
        forgotten = self.memory.forget_user(message.platform, message.user)
        for listener in self._forget_listeners:
            listener(message)
        return forgotten

    def on_forget_user(self, listener: Callable[[Message], None]) -> None:
        """Call `listener(message)` whenever the sender of `message` asks to be forgotten."""
        self._forget_listeners.append(listener)

    def purge_expired(self) -> int:
        """Apply `memory.retention_days` (at most once an hour); how many turns were deleted."""
        days = self.settings.memory.retention_days
        if days is None or time.time() - self._purged_at < 3600:
            return 0
        self._purged_at = time.time()
        try:
            removed = self.memory.purge_before(time.time() - days * 86400)
        except Exception as exc:  # noqa: BLE001 - a locked database must not stop the bot
            log.error("could not apply the retention period: %s: %s", type(exc).__name__, exc)
            return 0
        if removed:
            log.info("retention: deleted %d turns older than %g days", removed, days)
        return removed

    def private(self, text: str) -> str:
        """`text` with the personal data named in `memory.redact` replaced (before storage and the model)."""
        kinds = self.settings.memory.redact
        return pii.redact(text, kinds) if kinds else text

    async def first_delivery(self, event: str) -> bool:
        """Whether this is the first time `event` (a platform's update id, e.g. "telegram:8812") arrives,
        here or in another process sharing the memory; an adapter drops an update seen before.
        When the memory cannot say (a database down), the update is answered: better twice than never."""
        try:
            return await self._off_loop(self.memory.claim, event)
        except Exception as exc:  # noqa: BLE001
            log.warning("memory: could not check whether %s was already answered (%s: %s); answering it",
                        event, type(exc).__name__, exc)
            return True

    async def _off_loop(self, function: Callable[..., Any], *args: Any,
                        threads: ThreadPoolExecutor | None = None) -> Any:
        """Run a blocking memory call on the memory threads."""
        return await asyncio.get_running_loop().run_in_executor(
            threads or self._memory_threads, functools.partial(function, *args))

    @contextlib.asynccontextmanager
    async def _conversation_lock(self, key: ConversationKey) -> AsyncIterator[None]:
        """The store's lock on the conversation (exclusive across processes sharing a database).

        If the store cannot give it (a database down), the message is answered anyway: the in-process
        queue still orders it, and the failure is logged once a minute.
        """
        held = await self._take_lock(key)
        try:
            yield
        finally:
            if held is not None:
                await self._release_lock(key, held)

    async def _take_lock(self, key: ConversationKey) -> ContextManager[Any] | None:
        """The entered lock, or None when there is none to release (a no-op lock, or the store failed)."""
        try:
            held = self.memory.lock(key)
            if isinstance(held, contextlib.nullcontext):  # a store for one process: nothing to wait for
                return None
            entering = asyncio.get_running_loop().run_in_executor(self._lock_threads, held.__enter__)
        except Exception as exc:  # noqa: BLE001
            self._lock_failed(key, exc)
            return None
        try:
            await asyncio.shield(entering)
        except asyncio.CancelledError:
            # The thread goes on waiting and may still take the lock: release it then, or other
            # processes would wait for this conversation until this one exits.
            entering.add_done_callback(lambda done: self._release_when_taken(done, key, held))
            raise
        except Exception as exc:  # noqa: BLE001
            self._lock_failed(key, exc)
            return None
        return held

    async def _release_lock(self, key: ConversationKey, held: ContextManager[Any]) -> None:
        try:
            await self._off_loop(held.__exit__, None, None, None, threads=self._lock_threads)
        except Exception as exc:  # noqa: BLE001 - the database went away: its session lock went with it
            log.warning("memory: could not unlock the conversation %s: %s: %s", key, type(exc).__name__, exc)

    def _release_when_taken(self, entering: asyncio.Future, key: ConversationKey, held: ContextManager[Any]) -> None:
        if entering.cancelled() or entering.exception() is not None:
            return
        try:
            self._lock_threads.submit(self._quietly_release, key, held)
        except RuntimeError:
            pass  # shutting down: the store closes its connections, and their session locks go with them

    def _quietly_release(self, key: ConversationKey, held: ContextManager[Any]) -> None:
        try:
            held.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001
            log.warning("memory: could not unlock the conversation %s: %s: %s", key, type(exc).__name__, exc)

    def _lock_failed(self, key: ConversationKey, exc: Exception) -> None:
        if self._lock_failures.due("lock"):
            log.warning("memory: could not lock the conversation %s (%s: %s); answering without the lock",
                        key, type(exc).__name__, exc)

    async def generate(self, instruction: str, max_new_tokens: int | None = None) -> str:
        """Ask the language model a one-off question, outside any conversation."""
        return await self.generator.complete(instruction, max_new_tokens)

    # ------------------------------------------------------------ routing

    def is_admin(self, message: Message) -> bool:
        """Whether the sender is listed in `bot.admins` ("platform:user" or "platform:*")."""
        admins = self.settings.bot.admins
        return f"{message.platform}:{message.user}" in admins or f"{message.platform}:*" in admins

    def admit(self, message: Message, *, rate_limit: bool = True) -> Admission:
        """Check a message as it arrives, and give it a place among those waiting (`limits.max_pending`).

        An adapter that holds messages before `handle` (Telegram answers a
        chat's messages one at a time) calls this on arrival and passes the
        admission to `handle`, so what waits in the adapter counts toward the
        one bound; it releases the place once the reply is delivered (`with
        admission:`). A refused message carries its answer ("busy", "slow
        down", "too long") or None for a deliberate silence, and its `reason`.
        """
        text = clean_text(message.text)
        if not text:
            return Admission(message, refusal=None, reason="empty")
        limits = self.settings.limits
        if len(text) > limits.max_message_chars:
            return Admission(message, Reply(too_long(len(text), limits.max_message_chars),
                                            source="engine", remember=False), reason="too_long")
        user = f"{message.platform}:{message.user}"
        wait = self.rate_limiter.acquire(user) if rate_limit else 0
        if wait:
            return Admission(message, self._slow_down(user, wait), reason="rate_limited", retry_after=wait)
        message = message.replace(text=text)
        place = self.queue.take_place()
        if place is None:
            return Admission(message, self._busy(self.conversation(message)), reason="busy",
                             retry_after=BUSY_RETRY_AFTER)
        return Admission(message, place=place)

    async def handle(self, message: Message, on_text: OnText | None = None, *,
                     rate_limit: bool = True, admission: Admission | None = None,
                     earlier: Sequence[Turn] = ()) -> Reply | None:
        """Answer one message. None means a deliberate silence (an empty message, a flood).

        Messages of one conversation are answered one at a time, in the order
        they came; other conversations go on meanwhile. `rate_limit=False` is for
        the operator's own console: per-user rate limits protect the bot from
        remote users, not from the person running it. `admission` is what
        `admit` gave when the message arrived; without one, it is admitted now.
        `earlier` is the conversation as the client remembers it (an API
        client sends it with every request): stored as its start when the bot
        remembers nothing of it, and ignored otherwise.
        """
        own = admission is None
        if admission is None:
            admission = self.admit(message, rate_limit=rate_limit)
        try:
            if not admission.admitted:
                return admission.refusal
            message = admission.message
            key = self.conversation(message)
            async with self.queue.turn(key), self._conversation_lock(key):
                if earlier:
                    await self._off_loop(self._start_with, key, list(earlier))
                reply = await self._answer(message, on_text)
        except PluginError as exc:  # strict mode: a plugin failed, the bot stops (see `stopped_by_plugin`)
            if self.fatal_error is None:
                self.fatal_error = exc
            self._fatal.set()
            raise
        except Exception:  # noqa: BLE001 - a bug in chatforge must not kill the bot either
            log.exception("engine failed on a message from %s/%s", message.platform, message.chat)
            return apology("chatforge")
        finally:
            if own:
                admission.release()
        self.answered += 1
        return reply if reply else None

    async def stopped_by_plugin(self) -> PluginError:
        """Wait until a plugin fails in strict mode (`chatforge --strict`); that failure."""
        await self._fatal.wait()
        assert self.fatal_error is not None
        return self.fatal_error

    def _busy(self, conversation: ConversationKey) -> Reply | None:
        """Say "busy" once a minute per conversation: a flood in one chat gets one answer, not thousands."""
        if not self._told_busy.due(conversation):
            return None
        return Reply(BUSY, source="engine", remember=False)

    def _slow_down(self, user: str, wait: float) -> Reply | None:
        """Say "slow down" once a minute per user, however many short waits a long flood is made of."""
        if not self._told_to_wait.due(user):
            return None
        return Reply(f"You're sending messages faster than I can answer; please wait {max(1, round(wait))} s.",
                     source="engine", remember=False)

    async def _answer(self, message: Message, on_text: OnText | None) -> Reply:
        try:
            return await self._route(message, on_text)
        except SkillError as refusal:  # a plugin's message for the user, not a fault
            return Reply(str(refusal), source="plugin", remember=False)

    async def _route(self, message: Message, on_text: OnText | None) -> Reply:
        timeout = self.settings.limits.hook_timeout
        arguments: dict[str, Any] = {"message": message, "bot": self}
        async for plugin, result in self.host.aiter_call("chatforge_preprocess", arguments, timeout):
            result = await self._settle(plugin, "chatforge_preprocess", result)
            if isinstance(result, Reply):
                return result
            if isinstance(result, Message):
                arguments["message"] = message = result

        parsed = parse_command(message.text, self.command_prefix)
        if parsed is not None:
            reply = await self._run_command(message, *parsed)
        else:
            plugin, claimed = await self.host.acall_first("chatforge_handle_text", timeout, message=message, bot=self)
            if plugin is not None:
                reply = await self._plugin_reply(plugin, claimed, source=plugin, where="chatforge_handle_text",
                                                 remember=True)
            else:
                reply = await self._generate(message, on_text)

        as_produced = reply.text
        arguments = {"message": message, "reply": reply, "bot": self}
        async for plugin, new_text in self.host.aiter_call("chatforge_postprocess", arguments, timeout):
            new_text = await self._settle(plugin, "chatforge_postprocess", new_text)
            if isinstance(new_text, str):
                reply.text = new_text
        limit = self.settings.limits.max_reply_chars
        if len(reply.text) > limit:  # cut where a platform would split: never inside a code block
            reply.text = split_message(reply.text, limit - 2)[0] + "\n…"

        if reply.remember and reply.text:
            await self._off_loop(self._remember, message, reply, reply.text != as_produced)
        return reply

    async def _settle(self, plugin: str, hook_name: str, result: Any, failed: Any = None) -> Any:
        """Await a hook's result if it is awaitable; a failure is reported and gives `failed`."""
        if not inspect.isawaitable(result):
            return result
        timeout = self.settings.limits.hook_timeout
        try:
            return await asyncio.wait_for(contained(result), timeout)
        except SkillError:
            raise
        except PluginExited as exc:
            self.host.report(plugin, hook_name, exc.exit)
            return failed
        except asyncio.TimeoutError:
            self.host.report(plugin, hook_name, TimeoutError(f"no answer within {timeout:g} s (limits.hook_timeout)"))
            return failed
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
        if command.admin and not self.is_admin(message):
            return Reply(f"Sorry, {self.command_prefix}{name} is for the bot's admins.", source="engine", remember=False)
        context = CommandContext(message=message, args=args, bot=self, config=self.host.configs.get(command.plugin))
        ok, result = await self.host.run_plugin_code(command.plugin, f"/{name}", command.handler, [context],
                                                     self.settings.limits.hook_timeout)
        if not ok:
            return apology(f"the {command.plugin} plugin")
        # A command's plain answer is not conversation; a Reply decides for itself.
        return await self._plugin_reply(command.plugin, result, source=f"/{name}", where=f"/{name}", remember=False)

    async def _plugin_reply(self, plugin: str, result: Any, source: str, where: str, remember: bool) -> Reply:
        """Await and normalise what a plugin returned; its failure becomes an apology."""
        result = await self._settle(plugin, where, result, failed=FAILED)
        if result is FAILED:
            return apology(f"the {plugin} plugin")
        if isinstance(result, Reply):
            return result
        if result is None:
            return Reply("", source=source, remember=False)
        return Reply(str(result), source=source, remember=remember)

    async def _generate(self, message: Message, on_text: OnText | None) -> Reply:
        try:
            history = await self._off_loop(self.context, message)
        except Exception as exc:  # noqa: BLE001 - an unreadable memory: answer without context
            log.error("memory: could not read the conversation %s (%s: %s); answering without its history",
                      self.conversation(message), type(exc).__name__, exc)
            history = []
        try:
            text = await self.generator.reply(history, self.private(message.text), on_text)
        except Exception as exc:  # noqa: BLE001 - includes MemoryError from a too-big model
            source = getattr(self.generator, "failure_source", "the generator")  # e.g. "the model server at ..."
            log.error("%s failed: %s: %s", source, type(exc).__name__, exc)
            log.debug("generator traceback", exc_info=True)
            return apology(source)
        if not text:
            text = "…"  # the model produced nothing usable; say something rather than stay silent
        return Reply(text, source="generator")

    def _start_with(self, key: ConversationKey, turns: list[Turn]) -> None:
        """Store a client's record of the conversation when the bot has none (under the conversation's lock)."""
        try:
            if self.memory.count(key) == 0:
                self.memory.add(key, *(dataclasses.replace(turn, text=self.private(turn.text)) for turn in turns))
        except Exception as exc:  # noqa: BLE001 - a database down: answer without that history
            log.error("memory: could not store the earlier messages of %s (%s: %s); answering without them",
                      key, type(exc).__name__, exc)

    def _remember(self, message: Message, reply: Reply, edited: bool = False) -> None:
        """Store the question and its answer together (on a memory thread); a failure loses the turn, and
        says so in one line, but never the reply.

        The answer's meta says who wrote it (`source`) and whether a postprocess hook or the length limit
        changed it (`edited`): fine-tuning learns only what the model itself said.
        """
        key = self.conversation(message)
        made = {"source": reply.source, **({"edited": True} if edited else {})}
        now = time.time()
        try:
            self.memory.add(key,
                            Turn("user", self.private(message.text), now, message.user, message.display_name,
                                 dict(message.meta)),
                            Turn("assistant", self.private(reply.text), now, "", self.name, made,
                                 reply_to=message.user))
            self.purge_expired()
        except Exception as exc:  # noqa: BLE001 - a full disk or a database down must not stop the reply
            log.error("memory: could not save a turn of %s (%s: %s); the turn is lost, the reply is still sent",
                      key, type(exc).__name__, exc)

    async def close(self) -> None:
        """Run shutdown hooks, then release the generator and memory."""
        self.host.call("chatforge_shutdown", bot=self)
        try:
            closing = self.generator.close()
            if inspect.isawaitable(closing):  # a server backend closes its connections
                await closing
        finally:
            # A lock wait still queued is dropped; one in progress ends when the store closes its connections.
            # Off the loop: a store may take seconds to close (a pool), and adapters may still be finishing.
            self._lock_threads.shutdown(wait=False, cancel_futures=True)
            await asyncio.get_running_loop().run_in_executor(None, self._close_memory)

    def _close_memory(self) -> None:
        self._memory_threads.shutdown(wait=True)
        self.memory.close()
