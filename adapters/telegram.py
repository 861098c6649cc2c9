"""Telegram: the bot answers in private chats, and in groups when it is addressed.

Built on python-telegram-bot (PTB). It long-polls the Bot API (`mode:
polling`, the default) or receives updates on a small web server (`mode:
webhook`, behind an HTTPS reverse proxy). `base_url` points it at a local Bot
API server or a test server instead of api.telegram.org.

In a private chat every message is answered. In a group (by default,
`respond_in_groups: addressed`) the bot answers commands (`/help`,
`/help@this_bot`), messages that @mention it (the mention is removed from
the text) and replies to its own messages; other chatter and other bots are
ignored. Replies are plain text, split at 4096 characters with code blocks
kept whole; with `stream: true` the first words are sent at once and the
message is edited as the model writes.

Polling allows one process per token. Webhooks can feed several worker
processes behind a load balancer sharing one memory store: every worker is
given the same `secret_token`, one registers the webhook (`set_webhook:
true`) and the others only serve (`set_webhook: false`). An update Telegram
delivers twice (its POST was not answered in time, and the second one may
reach another worker) is answered once: the memory store's `claim()` says
whether it was seen before, in any of them.

The token is never logged or shown: it is masked in every log line (PTB and
httpx put it in request URLs), and PTB's rejected-token error, which quotes
it, is replaced by an AdapterError that does not. Nor is the webhook secret.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import secrets
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import telegram
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from telegram import BotCommand, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType, MessageEntityType
from telegram.error import (BadRequest, Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter,
                            TelegramError, TimedOut)
from telegram.ext import Application, ContextTypes, TypeHandler

from chatforge import redaction
from chatforge.adapter import Adapter, AdapterError, PlatformConfig
from chatforge.delivery import RetryAfter as DeliveryRetryAfter
from chatforge.delivery import StreamingReply, keep_typing, split_message
from chatforge.engine import Admission
from chatforge.hookspecs import hookimpl
from chatforge.message import Message

log = logging.getLogger("chatforge.telegram")

MESSAGE_LIMIT = 4096
"""Telegram's limit for one message's text (counted in UTF-16 code units)."""

_COMMAND_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
_SECRET_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


def telegram_length(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an emoji outside the BMP counts 2); a lone surrogate 1."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


class TelegramConfig(PlatformConfig):
    base_url: str = "https://api.telegram.org/bot"
    """The Bot API address the token is appended to; a local Bot API server's, e.g. http://localhost:8081/bot."""
    mode: Literal["polling", "webhook"] = "polling"
    """polling: ask Telegram for updates (works anywhere); webhook: Telegram posts them to `url`."""
    poll_timeout: int = Field(10, ge=0, le=50)
    """Seconds one long poll waits for new messages."""
    listen: str = "127.0.0.1"
    """Webhook mode: the address the web server binds (put an HTTPS reverse proxy in front)."""
    port: int = Field(8443, ge=1, le=65535)
    """Webhook mode: the port the web server binds."""
    url: str = ""
    """Webhook mode: the public HTTPS URL Telegram posts to; its path is served on listen:port."""
    secret_token: SecretStr = SecretStr("")
    """Webhook mode: Telegram sends it with every update (1-256 of A-Z a-z 0-9 _ -); keep it in the
    environment: ${TELEGRAM_WEBHOOK_SECRET}. Never logged. Unset: a random one per process, so several
    workers behind one URL must all be given the same one."""
    set_webhook: bool = True
    """Webhook mode: register `url` and the secret with Telegram (setWebhook) at start. With several workers
    behind one URL, true on one of them and false on the others (they then only serve; they need secret_token)."""
    respond_in_groups: Literal["addressed", "commands", "all"] = "addressed"
    """addressed: commands, @mentions and replies to the bot; commands: commands only; all: every message."""

    @field_validator("secret_token")
    @classmethod
    def _secret_token_charset(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if secret and not _SECRET_TOKEN.fullmatch(secret):
            raise ValueError("must be 1-256 characters from A-Z, a-z, 0-9, _ and -")
        return value

    @field_validator("set_webhook")
    @classmethod
    def _serving_needs_the_shared_secret(cls, value: bool, info: ValidationInfo) -> bool:
        # A worker that does not register the webhook cannot know a random secret: it must be told the one
        # the registering worker gives Telegram. (A bad secret_token is reported on its own line.)
        if (not value and info.data.get("mode") == "webhook" and "secret_token" in info.data
                and not info.data["secret_token"].get_secret_value()):
            raise ValueError("must be true unless secret_token is set: a worker that does not call setWebhook "
                             "checks updates against secret_token, which must be the one the registering worker "
                             "uses (give every worker the same secret_token)")
        return value


def _protect_logs(token: str) -> None:
    """Keep the token out of every log line, and keep httpx from logging request URLs at all.

    `chatforge run` registers every configured secret already; this also
    covers an adapter built in a program or a test.
    """
    redaction.REDACTOR.add([token])
    redaction.install()
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def _seconds(error: RetryAfter) -> float:
    value: Any = getattr(error, "_retry_after", None)
    if value is None:
        value = error.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


class TelegramAdapter(Adapter):
    name = "telegram"
    Config = TelegramConfig
    token_env = "TELEGRAM_BOT_TOKEN"

    def __init__(self, engine, config: TelegramConfig | None) -> None:
        super().__init__(engine, config or TelegramConfig())
        self.application: Application | None = None
        self.bot_id: int | None = None
        self.username: str = ""
        self._stop_requested = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._chat_locks: dict[tuple[int, int | None], tuple[asyncio.Lock, int]] = {}  # lock, messages using it
        self._webhook_runner: Any = None
        self._last_poll_warning: tuple[str, float] = ("", 0.0)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        token = self.require_token()
        _protect_logs(token)
        self._running = True
        self._finished.clear()
        try:
            application = self.application = self._build(token)
            if not await self._initialize(application):
                return  # stopped before Telegram could be reached
            try:
                await self._set_commands(application.bot)
                await application.start()
                if self.config.mode == "webhook":
                    await self._start_webhook(application)
                else:
                    await application.updater.start_polling(
                        timeout=self.config.poll_timeout,
                        allowed_updates=[Update.MESSAGE],
                        error_callback=self._polling_error,
                    )
                mode = self.config.mode
                if mode == "webhook" and not self.config.set_webhook:
                    mode += ", registered by another worker: set_webhook is false"
                self.announce(f"@{self.username} ({mode})")
                await self._stop_requested.wait()
            finally:
                await self._shut_down(application)
        finally:
            self._running = False
            self._finished.set()

    async def stop(self) -> None:
        """Stop receiving, let the replies in flight finish, then close the Telegram connection."""
        self._stop_requested.set()
        if self._running:
            await self._finished.wait()

    def _build(self, token: str) -> Application:
        base_url = self.config.base_url
        builder = Application.builder().token(token).base_url(base_url).job_queue(None)
        if base_url.endswith("/bot"):
            builder = builder.base_file_url(base_url[: -len("bot")] + "file/bot")
        application = builder.build()
        application.add_handler(TypeHandler(Update, self._on_update))
        application.add_error_handler(self._on_error)
        return application

    async def _initialize(self, application: Application) -> bool:
        """getMe until Telegram answers; a rejected token is an AdapterError. False if stopped first."""
        delay = 1.0
        while not self._stop_requested.is_set():
            try:
                await application.initialize()
            except InvalidToken as error:
                # PTB's own message quotes the token: it must not travel any further.
                await application.bot.shutdown()
                answer = str(error.__cause__ or "Unauthorized").replace(application.bot.token, "***")
                hint = "check it with @BotFather"
                custom_url = self.config.base_url != TelegramConfig.model_fields["base_url"].default
                if custom_url and "not found" in answer.lower():  # 404: perhaps no Bot API at that address
                    hint += f", and adapters.telegram.base_url ({self.config.base_url})"
                raise AdapterError(f"adapters.telegram.token: Telegram rejected the token "
                                   f"(getMe answered {answer}); {hint}") from None
            except TelegramError as error:
                log.warning("cannot reach the Telegram Bot API (%s: %s); retrying in %.0f s",
                            type(error).__name__, error, delay)
                try:
                    await asyncio.wait_for(self._stop_requested.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(30.0, delay * 2)
                continue
            me = application.bot.bot
            self.bot_id, self.username = me.id, me.username or ""
            return True
        await application.bot.shutdown()
        return False

    async def _shut_down(self, application: Application) -> None:
        """Stop receiving, hand the queued updates to the handler, finish replies, close."""
        steps = []
        if application.updater is not None and application.updater.running:
            steps.append(("stopping polling", application.updater.stop))
        if self._webhook_runner is not None:
            steps.append(("stopping the webhook server", self._stop_webhook))
        if application.running:
            steps.append(("stopping", application.stop))
        steps.append(("finishing replies", self.wait_in_flight))
        try:
            for what, step in steps:
                try:
                    await step()
                except Exception as exc:  # noqa: BLE001 - shut down as much as possible
                    log.warning("error while %s: %s: %s", what, type(exc).__name__, exc)
        finally:  # also when `chatforge run` gave up waiting and cancelled us: close the connections
            for task in list(self.in_flight):
                task.cancel()
            try:
                if application.running:  # cancelled while stopping: PTB refuses shutdown(); close the bot's connections
                    await application.bot.shutdown()
                else:
                    await application.shutdown()
            except Exception as exc:  # noqa: BLE001
                log.warning("error while shutting down: %s: %s", type(exc).__name__, exc)

    def _polling_error(self, error: TelegramError) -> None:
        """One line per failure (no traceback); the same failure repeated is logged once a minute."""
        if isinstance(error, Conflict):
            text = "another program is polling with this token (only one bot instance may run)"
        else:
            text = f"{type(error).__name__}: {error}"
        now = time.monotonic()
        last_text, last_time = self._last_poll_warning
        if text != last_text or now - last_time > 60:
            log.warning("polling Telegram failed (%s); retrying", text)
            self._last_poll_warning = (text, now)
        else:
            log.debug("polling Telegram failed again (%s)", text)

    async def _set_commands(self, bot: telegram.Bot) -> None:
        """Publish the commands in Telegram's command menu (the names Telegram accepts)."""
        if self.engine.command_prefix != "/":
            log.info("bot.command_prefix is not /, so the Telegram command menu is left empty")
            return
        commands = []
        for command in self.engine.commands:
            if not _COMMAND_NAME.fullmatch(command.name):
                log.info("command %r is not a valid Telegram command name; not in the menu", command.name)
                continue
            description = (command.help.strip() or command.name)[:256]
            commands.append(BotCommand(command.name, description))
        try:
            await bot.set_my_commands(commands[:100])
        except TelegramError as error:
            log.warning("could not publish the command menu: %s: %s", type(error).__name__, error)

    # ------------------------------------------------------------ webhook

    async def _start_webhook(self, application: Application) -> None:
        from chatforge.adapters.telegram_webhook import WebhookReceiver

        if not self.config.url:
            raise AdapterError("adapters.telegram.url: webhook mode needs the public HTTPS URL "
                               "Telegram posts updates to")
        secret = self.config.secret_token.get_secret_value()
        if not secret:  # one process alone: a secret of its own (several workers must share a configured one)
            secret = secrets.token_urlsafe(32)
            redaction.REDACTOR.add([secret])
        bot = application.bot
        receiver = WebhookReceiver(urlsplit(self.config.url).path or "/", secret,
                                   parse=lambda data: Update.de_json(data, bot), queue=application.update_queue,
                                   host=self.config.listen, port=self.config.port)
        try:
            await receiver.start()
        except OSError as error:
            raise AdapterError(f"adapters.telegram.port: cannot listen on {self.config.listen}:{self.config.port} "
                               f"({error.strerror or error})") from None
        self._webhook_runner = receiver
        if not self.config.set_webhook:
            # Another worker registers the webhook; this one only serves what the load balancer sends it.
            # (No worker deletes the webhook at exit: the others still serve it.) Said in the announcement.
            return
        try:
            await bot.set_webhook(self.config.url, secret_token=secret, allowed_updates=[Update.MESSAGE])
        except BadRequest as error:
            raise AdapterError(f"adapters.telegram.url: Telegram refused the webhook URL ({error})") from None

    async def _stop_webhook(self) -> None:
        receiver, self._webhook_runner = self._webhook_runner, None
        await receiver.stop()

    # ------------------------------------------------------------ incoming

    async def _on_update(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        incoming = self.to_message(message, update)
        if incoming is None:
            return
        # Telegram delivers an update again when its POST (or getUpdates) was not answered in time, and a load
        # balancer may give the second delivery to another worker sharing the memory: answer it once. Awaited
        # here, before the next update is taken (PTB hands them over one at a time), so a chat's messages keep
        # their order. The bot's id is in the key: update ids count per bot, and bots may share a database.
        if not await self.engine.first_delivery(f"telegram:{self.bot_id}:{update.update_id}"):
            log.debug("update %s was delivered before (here or to another worker); dropped", update.update_id)
            return
        # Admitted on arrival: a message waiting for its chat's turn here counts toward limits.max_pending.
        admission = self.engine.admit(incoming)
        if admission.admitted:
            self.track(self._answer(message, incoming, admission))
        elif admission.refusal is not None:  # "busy" or "slow down": said at once, not after the queue
            self.track(self._refuse(message, incoming, admission.refusal.text))

    async def _on_error(self, _update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        log.error("could not handle a Telegram update: %s: %s", type(error).__name__, error)
        log.debug("traceback", exc_info=error)

    def to_message(self, message: telegram.Message, update: Any = None) -> Message | None:
        """The chatforge Message, or None when the bot should stay out of it."""
        user = message.from_user
        text = message.text
        if user is None or user.is_bot or not text:
            return None
        direct = message.chat.type == ChatType.PRIVATE
        mentioned = self._mentions_me(message)
        replied_to_me = self._replies_to_me(message)
        prefix = self.engine.command_prefix
        first_word = text.split(maxsplit=1)[0] if text.strip() else ""
        is_command = text.startswith(prefix)
        if is_command and not direct:
            addressee = first_word.partition("@")[2]
            if addressee and addressee.lower() != self.username.lower():
                return None  # /help@other_bot
        if not direct:
            wanted = {
                "all": True,
                "commands": is_command,
                "addressed": is_command or mentioned or replied_to_me,
            }[self.config.respond_in_groups]
            if not wanted:
                return None
        if mentioned and self.username:
            text = re.sub(rf"(?<!\w)@{re.escape(self.username)}\b[,:]?", " ", text, flags=re.IGNORECASE)
            text = re.sub(r"[ \t]{2,}", " ", text).strip()
        if first_word.partition("@")[0] == "/start" and prefix == "/" and self.engine.commands.get("start") is None:
            text = "/help"  # what Telegram sends when someone opens the bot: greet them with the commands
        thread = message.message_thread_id if message.is_topic_message else None
        return Message(
            text=text,
            platform="telegram",
            chat=str(message.chat.id),
            thread=str(thread) if thread is not None else None,
            user=str(user.id),
            display_name=user.full_name,
            direct=direct,
            mentioned=mentioned or replied_to_me,
            raw=update if update is not None else message,
        )

    def _mentions_me(self, message: telegram.Message) -> bool:
        if not self.username:
            return False
        wanted = f"@{self.username}".lower()
        for entity, value in message.parse_entities([MessageEntityType.MENTION]).items():
            if value.lower() == wanted:
                return True
        for entity in message.entities:
            if entity.type == MessageEntityType.TEXT_MENTION and entity.user and entity.user.id == self.bot_id:
                return True
        return False

    def _replies_to_me(self, message: telegram.Message) -> bool:
        original = message.reply_to_message
        if original is None or original.forum_topic_created is not None:
            return False  # in a forum topic every message "replies" to the topic's first message
        return original.from_user is not None and original.from_user.id == self.bot_id

    # ------------------------------------------------------------ replying

    async def _refuse(self, message: telegram.Message, incoming: Message, text: str) -> None:
        assert self.application is not None
        thread_id = message.message_thread_id if message.is_topic_message else None
        try:
            await self._send(self.application.bot, message.chat.id, text, thread_id,
                             ReplyParameters(message.message_id, allow_sending_without_reply=True))
        except TelegramError as error:
            log.warning("could not reply in chat %s: %s: %s", incoming.chat, type(error).__name__, error)

    async def _answer(self, message: telegram.Message, incoming: Message, admission: Admission) -> None:
        key = (message.chat.id, message.message_thread_id if message.is_topic_message else None)
        lock, users = self._chat_locks.get(key, (asyncio.Lock(), 0))
        self._chat_locks[key] = (lock, users + 1)
        try:
            with admission:  # the place is held until the reply is sent
                async with lock:  # one reply at a time per chat, in the order the messages came
                    await self._reply(message, incoming, admission)
        except TelegramError as error:  # blocked by the user, chat gone, Telegram down...
            log.warning("could not reply in chat %s: %s: %s", incoming.chat, type(error).__name__, error)
        except Exception:  # noqa: BLE001 - one failed reply must not stop the bot
            log.exception("could not answer a message in chat %s", incoming.chat)
        finally:
            lock, users = self._chat_locks[key]
            if users > 1:
                self._chat_locks[key] = (lock, users - 1)
            else:
                del self._chat_locks[key]

    async def _reply(self, message: telegram.Message, incoming: Message, admission: Admission) -> None:
        assert self.application is not None
        bot = self.application.bot
        chat_id = message.chat.id
        thread_id = message.message_thread_id if message.is_topic_message else None
        reply_to = ReplyParameters(message.message_id, allow_sending_without_reply=True)

        async def typing() -> None:
            await bot.send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=thread_id)

        if not self.config.stream:
            async with keep_typing(typing, every=4):
                reply = await self.engine.handle(incoming, admission=admission)
            if reply:
                parts = split_message(reply.text, MESSAGE_LIMIT, measure=telegram_length)
                for index, part in enumerate(parts):
                    await self._send(bot, chat_id, part, thread_id, reply_to if index == 0 else None)
            return

        async def send(text: str) -> telegram.Message:
            return await self._send(bot, chat_id, text, thread_id, reply_to, retry=False)

        async def edit(sent: telegram.Message, text: str) -> None:
            try:
                await bot.edit_message_text(text, chat_id=chat_id, message_id=sent.message_id)
            except RetryAfter as limited:
                raise DeliveryRetryAfter(_seconds(limited)) from None
            except BadRequest as error:
                if "not modified" not in str(error).lower():
                    raise

        streaming: StreamingReply[telegram.Message] = StreamingReply(
            send, edit, interval=self.config.stream_interval, limit=MESSAGE_LIMIT, measure=telegram_length)
        async with keep_typing(typing, every=4):
            reply = await self.engine.handle(incoming, on_text=streaming.on_text, admission=admission)
        if reply:
            for part in await streaming.finish(reply.text):
                await self._send(bot, chat_id, part, thread_id, None)
        else:
            await streaming.finish("")  # stop the pump
            if streaming.handle is not None:  # a plugin silenced what was already streaming
                try:
                    await bot.delete_message(chat_id, streaming.handle.message_id)
                except TelegramError as error:
                    log.info("could not delete a silenced reply: %s", error)

    async def _send(self, bot: telegram.Bot, chat_id: int, text: str, thread_id: int | None,
                    reply_to: ReplyParameters | None, retry: bool = True) -> telegram.Message:
        """sendMessage, waiting out a flood limit (429) a few times."""
        for attempt in range(4):
            try:
                return await bot.send_message(chat_id, text, message_thread_id=thread_id,
                                              reply_parameters=reply_to)
            except RetryAfter as limited:
                if not retry:
                    raise DeliveryRetryAfter(_seconds(limited)) from None
                if attempt == 3:
                    raise
                wait = min(_seconds(limited), 60.0)
                log.info("Telegram asks to wait %.0f s before sending", wait)
                await asyncio.sleep(wait)
            except (BadRequest, Forbidden, TimedOut):
                raise  # not worth retrying; and a timed-out send may have arrived: resending could duplicate it
            except NetworkError as error:  # the request did not get through (502, connection refused...)
                if attempt == 3:
                    raise
                log.info("sending failed (%s); retrying", error)
                await asyncio.sleep(1 + attempt)
        raise AssertionError("unreachable")


@hookimpl
def chatforge_register_adapters(register) -> None:
    register(TelegramAdapter)
