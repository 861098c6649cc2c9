"""Serve the bot on Discord, with discord.py.

    adapters:
      discord:
        enabled: true
        token: ${DISCORD_TOKEN}
        respond_to: [dm, mention]     # or [all], or channel ids: ["123456789012345678"]

What it does:

- Answers direct messages and messages that @mention the bot, its role, or
  reply to one of its messages (by default; see `respond_to`). The bot's own
  messages, other bots' and webhooks' are never answered.
- A message that starts with `command_prefix` and names a registered command
  (`/sentiment I love it`) is a command wherever the bot can read it, addressed
  or not. Each command is also a Discord slash command (an application command
  with an optional `args` text option), synced when the bot starts.
- Shows "typing..." while the model works, replies to the triggering message,
  and splits replies longer than 2000 characters (counted in UTF-16 units, the
  stricter count; never inside a code block or a character).
  With `stream: true` the reply is sent at once and edited as the model writes.
- Needs the *Message Content* privileged intent (Developer Portal -> Bot ->
  Privileged Gateway Intents) to read what people write in servers.
- While Discord cannot be reached (no network, DNS, connection refused, a 5xx
  at login), it tries again 1, 2, 4... up to 30 s later, one warning a try;
  once connected it logs "discord: connected as NAME". A rejected token or
  refused intent is an AdapterError (`chatforge run` exits 2); any other
  failure to connect is raised.
- Shards, for one bot served by several processes: with `shard_count: N`, a
  process runs the shards in `shard_ids` (all N when it is left out) on one
  `discord.AutoShardedClient`. Discord sends each guild's events on shard
  (guild_id >> 22) % N and direct messages on shard 0, so every shard must run
  in exactly one process. Slash commands are synced by the process that runs
  shard 0 only (all of them answer them).

        shard_count: 4
        shard_ids: ${SHARD_IDS}       # "0,1" in one process, "2,3" in another

Pointing at another Discord (`api_base`, `gateway_url`) is for proxies and
tests. discord.py reads its endpoints from class attributes shared by every
client in the process (`discord.http.Route.BASE`,
`discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`); this adapter never
assigns them. Instead it rewrites URLs on the way out, per client: its own
`HTTPClient` instance's `request` and `ws_connect` (REST and gateway), and,
for interaction responses (which go through discord.py's webhook adapter,
looked up in the `discord.webhook.async_.async_context` context variable), a
rewriting webhook adapter set in that context variable inside the adapter's
own task only. Other discord.py clients in the same process, even another
DiscordAdapter, are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Annotated, Any, Optional, Union

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.webhook.async_ import AsyncWebhookAdapter, async_context
from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from chatforge.adapter import Adapter, AdapterError, PlatformConfig
from chatforge.delivery import RetryAfter, StreamingReply, keep_typing, split_message
from chatforge.engine import Admission
from chatforge.hookspecs import hookimpl
from chatforge.message import Message

log = logging.getLogger("chatforge.adapters.discord")

LIMIT = 2000
"""Discord's length limit of one message. Discord counts code points; the parts are measured the stricter way,
in UTF-16 code units (`split_message`'s and `StreamingReply`'s default), so an emoji counts 2."""
TYPING_EVERY = 8.0
"""Discord shows "typing..." for about 10 s after each trigger."""
ANSWER_WITHIN = 2.0
"""An interaction must be answered within 3 s; slower answers are deferred, then followed up."""

IDENTIFY_EVERY = 5.0
"""Seconds discord.py waits before each IDENTIFY but a process's first: Discord allows most bots one IDENTIFY
per 5 s (`session_start_limit.max_concurrency` is 1)."""
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
"""Seconds between attempts to reach Discord: doubling from the first to the last."""

DEFAULT_API_BASE = discord.http.Route.BASE
DEFAULT_GATEWAY = str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
KEYWORDS = ("dm", "mention", "all")


def _shard_id(value: Any, info: ValidationInfo) -> Any:
    """One `shard_ids` entry: a whole number below `shard_count` (which is checked before it)."""
    if isinstance(value, bool):
        raise ValueError("a shard id (a whole number)")
    return value


def _below_shard_count(value: int, info: ValidationInfo) -> int:
    count = info.data.get("shard_count")
    if count is not None and not 0 <= value < count:  # without shard_count, the whole list is blamed
        raise ValueError("0 (shard_count is 1)" if count == 1 else
                         f"a shard id from 0 to {count - 1} (shard_count is {count})")
    return value


def _respond_target(value: Any) -> str:
    """One `respond_to` entry: a keyword, or a channel id (which YAML may read as a number)."""
    text = str(value).strip().lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if text not in KEYWORDS and not (text.isdigit() and 15 <= len(text) <= 21):
        raise ValueError('"dm", "mention", "all" or a channel id (a long number)')
    return text


class DiscordConfig(PlatformConfig):
    respond_to: Annotated[list[Annotated[str, BeforeValidator(_respond_target)]], Field(min_length=1)] = \
        ["dm", "mention"]
    """Where free text is answered: "dm", "mention", "all", and/or channel ids (which answer everything there)."""
    api_base: str = DEFAULT_API_BASE
    """Discord's REST API; change only for a proxy or a test server."""
    gateway_url: str = DEFAULT_GATEWAY
    """Discord's gateway websocket; change only for a proxy or a test server."""
    command_prefix: str = "/"
    """Typed messages starting with this and naming a command are commands."""
    slash_commands: bool = True
    """Register every command as a Discord slash command when the bot starts (the process with shard 0 does)."""
    shard_count: Optional[int] = Field(None, ge=1)
    """How many shards the bot has in all; None: no sharding, one connection gets everything."""
    shard_ids: Optional[Annotated[list[Annotated[int, BeforeValidator(_shard_id), AfterValidator(_below_shard_count)]],
                                  Field(min_length=1)]] = None
    """The shards this process runs (each in exactly one process); None: all of them. Needs shard_count."""

    @field_validator("respond_to", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return value if isinstance(value, (list, tuple)) else [value]

    @field_validator("shard_ids", mode="before")
    @classmethod
    def _ids_or_a_list(cls, value: Any) -> Any:
        """A list, one id, or (from the environment: `${SHARD_IDS}`) ids in a string: "0,1" or "0 1"."""
        if isinstance(value, str):
            return [part for part in re.split(r"[\s,]+", value) if part]
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("shard_ids")
    @classmethod
    def _ids(cls, value: Optional[list[int]], info: ValidationInfo) -> Optional[list[int]]:
        if value is None:
            return value
        if "shard_count" in info.data and info.data["shard_count"] is None:  # (absent when it is wrong itself)
            raise ValueError("must come with shard_count (how many shards the bot has in all)")
        repeated = next((shard for n, shard in enumerate(value) if shard in value[:n]), None)
        if repeated is not None:
            raise ValueError(f"must list each shard once ({repeated} is there twice)")
        return value

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"an http(s):// URL such as {DEFAULT_API_BASE}")
        return value.rstrip("/")

    @field_validator("gateway_url")
    @classmethod
    def _gateway_url(cls, value: str) -> str:
        if not re.match(r"^wss?://[^/\s]+", value):
            raise ValueError(f"a ws(s):// URL such as {DEFAULT_GATEWAY}")
        return value

    @field_validator("command_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.strip() != value:
            raise ValueError("a non-empty prefix without spaces, such as /")
        return value


# ---------------------------------------------------------------- endpoints


def _rebase_rest(url: str, api_base: str) -> str:
    """A URL built on discord.py's REST base, moved to `api_base`."""
    base = discord.http.Route.BASE
    if api_base != base and url.startswith(base):
        return api_base + url[len(base):]
    return url


def _rebase_gateway(url: str, gateway_url: str) -> str:
    """discord.py's default gateway (with its query), moved to `gateway_url`; resume URLs are left alone."""
    default = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    parsed = yarl.URL(url)
    if gateway_url == str(default) or parsed.with_query(None) != default.with_query(None):
        return url
    return str(yarl.URL(gateway_url).with_query(parsed.query))


class _GatewayUnreachable(Exception):
    """The gateway could not be reached before there was a session: the adapter retries it.

    discord.py's own reconnect assumes a session (it fails on the first connection, after logging a
    traceback), so that case is taken out of its hands.
    """


class _Stopping(Exception):
    """`stop()` was called while a gateway connection was being made: it must not IDENTIFY."""


def _transient(error: BaseException) -> bool:
    """Whether a failure to connect is worth retrying: the network, or Discord having trouble (5xx, 429)."""
    if isinstance(error, discord.HTTPException):
        return error.status >= 500 or error.status == 429
    return isinstance(error, (aiohttp.ClientError, OSError, asyncio.TimeoutError, discord.GatewayNotFound,
                              _GatewayUnreachable))


class _RebasedWebhookAdapter(AsyncWebhookAdapter):
    """discord.py's webhook adapter (interaction responses, follow-ups) with REST moved to `api_base`."""

    def __init__(self, api_base: str) -> None:
        super().__init__()
        self.api_base = api_base

    async def request(self, route: discord.http.Route, *args: Any, **kwargs: Any) -> Any:
        route.url = _rebase_rest(route.url, self.api_base)
        return await super().request(route, *args, **kwargs)


class _Adapted:
    """What both clients (`_Client`, `_ShardedClient`) add to discord.py's: endpoints, slash commands, events."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        config = adapter.config
        http = self.http
        if config.api_base != DEFAULT_API_BASE:
            request = http.request

            async def rebased_request(route: discord.http.Route, **kwargs: Any) -> Any:
                route.url = _rebase_rest(route.url, config.api_base)
                return await request(route, **kwargs)

            http.request = rebased_request  # type: ignore[method-assign]
        ws_connect = http.ws_connect

        async def connect_gateway(url: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
            try:
                return await ws_connect(_rebase_gateway(url, config.gateway_url), **kwargs)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if self._before_session():
                    raise _GatewayUnreachable() from exc
                raise

        http.ws_connect = connect_gateway  # type: ignore[method-assign]
        self.tree: app_commands.CommandTree | None = None
        if config.slash_commands:
            self.tree = app_commands.CommandTree(self)
            for command in adapter.engine.commands:
                try:
                    self.tree.add_command(adapter.slash_command(command))
                except Exception as exc:  # noqa: BLE001 - one odd command must not stop the others
                    log.warning("cannot offer /%s as a Discord slash command: %s", command.name, exc)

    def _before_session(self) -> bool:
        """Whether the client is making its first gateway connection (a failure is then the adapter's to retry)."""
        return self.ws is None

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py's pause before each IDENTIFY but a process's first (Discord's identify rate limit),
        cut short by `stop()`."""
        if not initial:
            await self._identify_pause()

    async def _identify_pause(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.adapter._stop_requested.wait(), IDENTIFY_EVERY)

    async def setup_hook(self) -> None:
        if self.tree is not None and self.adapter.syncs_commands:
            self.adapter.background(self._sync())
        elif self.tree is not None:
            log.info("slash commands are synced by the process that runs shard 0, not this one")

    async def _sync(self) -> None:
        try:
            synced = await self.tree.sync()
            log.info("synced %d slash commands", len(synced))
        except discord.HTTPException as exc:
            log.warning("could not register the slash commands (was the bot invited with the "
                        "applications.commands scope?): %s", exc)

    async def on_ready(self) -> None:
        account = f"{self.user} (id {self.user.id if self.user else '?'})"
        config = self.adapter.config
        if config.shard_count is not None:
            shards = config.shard_ids if config.shard_ids is not None else range(config.shard_count)
            account += (f" on shard{'s' if len(shards) > 1 else ''} {', '.join(map(str, shards))} "
                        f"(shard_count: {config.shard_count})")
        self.adapter.announce(account)

    async def on_message(self, message: discord.Message) -> None:
        self.adapter.on_message(message)


class _Client(_Adapted, discord.Client):
    """The bot on one gateway connection: no sharding."""


class _ShardedClient(_Adapted, discord.AutoShardedClient):
    """The bot on the shards `shard_ids` of `shard_count`, one gateway connection each, in this process."""

    _launching = False

    def _before_session(self) -> bool:
        return self._launching

    async def launch_shards(self) -> None:
        self._launching = True
        try:
            await super().launch_shards()
        finally:
            self._launching = False

    async def launch_shard(self, gateway: yarl.URL, shard_id: int, *, initial: bool = False) -> None:
        """discord.py's, except that a shard that cannot connect is raised, not retried every 5 s forever.

        discord.py logs a traceback at each of those tries; raised, it is the adapter's to retry (with
        backoff, one warning a try), as for an unsharded client. With shard_count given, discord.py connects
        to DiscordWebSocket.DEFAULT_GATEWAY (GET /gateway/bot is asked only when it must count the shards),
        which `gateway_url` moves.
        """
        if not initial:
            await self._identify_pause()  # here rather than in from_client, so that stop() connects no more
        if self.adapter._stop_requested.is_set():
            raise _Stopping()
        # initial=True: the pause before its IDENTIFY is over.
        connecting = discord.gateway.DiscordWebSocket.from_client(self, initial=True, gateway=gateway,
                                                                  shard_id=shard_id)
        try:
            ws = await asyncio.wait_for(connecting, timeout=self.shard_connect_timeout)
        except _GatewayUnreachable:
            raise
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, discord.ConnectionClosed) as exc:
            raise _GatewayUnreachable() from exc
        if self.adapter._stop_requested.is_set():
            await ws.close(code=1000)
            raise _Stopping()
        # What discord.py's launch_shard does with a connected shard (its private names: 2.7 and 2.8).
        shard = discord.shard.Shard(ws, self, self._AutoShardedClient__queue.put_nowait)
        self._AutoShardedClient__shards[shard_id] = shard
        shard.launch()


# ---------------------------------------------------------------- the adapter


class DiscordAdapter(Adapter):
    name = "discord"
    Config = DiscordConfig
    token_env = "DISCORD_TOKEN"

    def __init__(self, engine, config: DiscordConfig | None) -> None:
        super().__init__(engine, config or DiscordConfig())
        self.client: _Client | _ShardedClient | None = None
        self._stop_requested = asyncio.Event()
        self._background: set[asyncio.Task] = set()

    @property
    def syncs_commands(self) -> bool:
        """Whether this process registers the slash commands: once per bot, by the one that runs shard 0."""
        config = self.config
        return config.slash_commands and (config.shard_ids is None or 0 in config.shard_ids)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, retrying with backoff while Discord cannot be reached, and serve until stopped.

        A rejected token or intent is an AdapterError; any other failure is raised: it ends `run()`, which
        `chatforge run` turns into a non-zero exit for a supervisor to act on.
        """
        token = self.require_token()
        # Interaction responses use the webhook adapter found in this context
        # variable; setting it here affects this task and the tasks it starts only.
        if self.config.api_base != DEFAULT_API_BASE:
            async_context.set(_RebasedWebhookAdapter(self.config.api_base))
        # The bot never joins voice; discord.py warns once per process that voice
        # libraries are missing (then clears these flags itself). Skip the noise.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        delay = RETRY_FIRST
        while not self._stop_requested.is_set():
            try:
                await self._connect(token)
            except AdapterError:
                raise
            except Exception as exc:
                if self._stop_requested.is_set():
                    return  # stopped while connecting: what closing the session caused is moot
                if not _transient(exc):
                    raise
                gateway = isinstance(exc, _GatewayUnreachable)
                cause = exc.__cause__ if gateway else exc
                log.warning("cannot reach %s (%s: %s); retrying in %.0f s",
                            "Discord's gateway" if gateway else "Discord", type(cause).__name__, cause, delay)
            else:
                if self._stop_requested.is_set():
                    return
                log.warning("the Discord client closed without being asked to; reconnecting in %.0f s", delay)
            try:
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(RETRY_MAX, delay * 2)

    async def _connect(self, token: str) -> None:
        """One attempt, on a new client: log in, then hold the gateway (discord.py resumes it when it drops)."""
        intents = discord.Intents.default()
        intents.message_content = True
        # Replies come from a language model: they must never ping @everyone, roles or users.
        options: dict[str, Any] = {"intents": intents, "allowed_mentions": discord.AllowedMentions.none()}
        if self.config.shard_count is None:
            self.client = client = _Client(self, **options)
        else:
            self.client = client = _ShardedClient(self, shard_count=self.config.shard_count,
                                                  shard_ids=self.config.shard_ids, **options)
        try:
            try:
                await client.login(token)
            except discord.LoginFailure:
                raise AdapterError("adapters.discord.token: Discord rejected the token (401 Unauthorized); "
                                   "copy it again from the Developer Portal (Bot -> Reset Token)") from None
            if self._stop_requested.is_set():
                return
            await client.connect(reconnect=True)
        except discord.PrivilegedIntentsRequired:
            raise AdapterError("adapters.discord: Discord refused the Message Content intent; enable it in the "
                               "Developer Portal (your application -> Bot -> Privileged Gateway Intents -> "
                               "Message Content Intent)") from None
        except discord.ConnectionClosed as exc:
            if exc.code == 4004:
                raise AdapterError("adapters.discord.token: Discord rejected the token (gateway close 4004); "
                                   "copy it again from the Developer Portal (Bot -> Reset Token)") from None
            raise
        finally:
            for task in list(self._background):
                task.cancel()
            if not client.is_closed():
                await client.close()

    async def stop(self) -> None:
        self._stop_requested.set()
        await self.wait_in_flight()
        if self.client is not None and not self.client.is_closed():
            await self.client.close()

    def background(self, coroutine: Any) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ messages

    def on_message(self, message: discord.Message) -> None:
        if self._stop_requested.is_set() or self.client is None or self.client.user is None:
            return
        if message.author.id == self.client.user.id or message.author.bot or message.webhook_id is not None:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        incoming = self.to_message(message)
        if incoming is None:
            return
        # Admitted on arrival, so a reply still being delivered counts toward limits.max_pending too.
        admission = self.engine.admit(incoming)
        if admission.admitted or admission.refusal is not None:  # a refusal ("busy"...) is said, without typing
            self.track(self._answer(message, incoming, admission))

    def to_message(self, message: discord.Message) -> Message | None:
        """The neutral Message for a Discord message, or None when the bot should stay silent."""
        me = self.client.user
        channel = message.channel
        own_role = message.guild.self_role if message.guild is not None else None
        reference = message.reference.resolved if message.reference is not None else None
        mentioned = (any(user.id == me.id for user in message.mentions)
                     or (own_role is not None and own_role in message.role_mentions)
                     or (isinstance(reference, discord.Message) and reference.author.id == me.id))
        addressing = rf"<@!?{me.id}>" + (rf"|<@&{own_role.id}>" if own_role is not None else "")
        text = re.sub(rf"[ \t]*(?:{addressing})[ \t]*", " ", message.content).strip()
        direct = message.guild is None
        if isinstance(channel, discord.Thread):
            chat, thread = str(channel.parent_id), str(channel.id)
        else:
            chat, thread = str(channel.id), None
        command = self.as_command(text)
        if command is not None:
            text = command
        elif not self.addressed(direct, mentioned, chat, thread):
            return None
        if not text:
            return None
        author = message.author
        return Message(text=text, platform="discord", chat=chat, thread=thread, user=str(author.id),
                       display_name=author.display_name, direct=direct, mentioned=mentioned, raw=message)

    def addressed(self, direct: bool, mentioned: bool, chat: str, thread: str | None) -> bool:
        respond_to = self.config.respond_to
        if "all" in respond_to:
            return True
        if direct:
            return "dm" in respond_to
        if mentioned and "mention" in respond_to:
            return True
        return chat in respond_to or (thread is not None and thread in respond_to)

    def as_command(self, text: str) -> str | None:
        """`!name args` (with this adapter's prefix) -> the engine's `/name args`, when `name` is a command."""
        prefix = self.config.command_prefix
        if not text.startswith(prefix):
            return None
        match = re.match(r"(\S+)\s*(.*)", text[len(prefix):], re.DOTALL)
        if match is None:
            return None
        name = match.group(1).split("@", 1)[0].lower()
        if self.engine.commands.get(name) is None:
            return None
        return f"{self.engine.command_prefix}{name} {match.group(2).strip()}".rstrip()

    async def _answer(self, message: discord.Message, incoming: Message, admission: Admission) -> None:
        with admission:  # the place is held until the reply is sent
            await self._deliver(message, incoming, admission)

    async def _deliver(self, message: discord.Message, incoming: Message, admission: Admission) -> None:
        channel = message.channel

        async def typing() -> None:
            await channel.typing()

        async def send(text: str) -> discord.Message:
            return await channel.send(text, reference=message.to_reference(fail_if_not_exists=False),
                                      mention_author=False)

        try:
            showing = keep_typing(typing, every=TYPING_EVERY) if admission.admitted else contextlib.nullcontext()
            async with showing:
                if self.config.stream:
                    streaming = StreamingReply(send, _edit, interval=self.config.stream_interval, limit=LIMIT)
                    reply = await self.engine.handle(incoming, on_text=streaming.on_text, admission=admission)
                    rest = await streaming.finish(reply.text if reply else "")
                else:
                    reply = await self.engine.handle(incoming, admission=admission)
            if not reply:
                return
            if not self.config.stream:
                parts = split_message(reply.text, LIMIT) or [reply.text[:LIMIT]]
                await send(parts[0])
                rest = parts[1:]
            for part in rest:
                await channel.send(part)
        except discord.Forbidden as exc:
            log.warning("cannot answer in channel %s (missing permission?): %s", incoming.chat, exc)
        except (discord.HTTPException, RetryAfter, RuntimeError, aiohttp.ClientError, OSError) as exc:
            log.warning("could not deliver a reply in channel %s: %s: %s", incoming.chat, type(exc).__name__, exc)

    # ------------------------------------------------------------ slash commands

    def slash_command(self, command: Any) -> app_commands.Command:
        """One Discord application command for an engine command: name, help, optional `args`."""
        adapter = self

        if command.usage:
            @app_commands.describe(args=command.usage[:100])
            async def callback(interaction: discord.Interaction, args: Optional[str] = None) -> None:
                await adapter.track(adapter.on_interaction(interaction, command.name, args or ""))
        else:
            async def callback(interaction: discord.Interaction) -> None:  # type: ignore[misc]
                await adapter.track(adapter.on_interaction(interaction, command.name, ""))

        return app_commands.Command(name=command.name, description=command.help[:100], callback=callback)

    async def on_interaction(self, interaction: discord.Interaction, name: str, args: str) -> None:
        channel = interaction.channel
        if isinstance(channel, discord.Thread):
            chat, thread = str(channel.parent_id), str(channel.id)
        else:
            chat, thread = str(interaction.channel_id), None
        user = interaction.user
        incoming = Message(text=f"{self.engine.command_prefix}{name} {args}".rstrip(), platform="discord",
                           chat=chat, thread=thread, user=str(user.id), display_name=user.display_name,
                           direct=interaction.guild_id is None, mentioned=True, raw=interaction)
        work = asyncio.create_task(self.engine.handle(incoming))
        deferred = False
        try:
            done, _ = await asyncio.wait({work}, timeout=ANSWER_WITHIN)
            if not done:
                await interaction.response.defer(thinking=True)
                deferred = True
            reply = await work
            parts = (split_message(reply.text, LIMIT) or [reply.text[:LIMIT]]) if reply else []
            if not parts:
                if deferred:
                    await interaction.followup.send("Done.", ephemeral=True)
                else:
                    await interaction.response.send_message("Done.", ephemeral=True)
                return
            if deferred:
                await interaction.followup.send(parts[0])
            else:
                await interaction.response.send_message(parts[0])
            for part in parts[1:]:
                await interaction.followup.send(part)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("could not answer the /%s interaction in channel %s: %s: %s",
                        name, chat, type(exc).__name__, exc)
        finally:
            if not work.done():
                work.cancel()


async def _edit(sent: discord.Message, text: str) -> None:
    """Edit a streamed message; Discord's "slow down" (429) becomes RetryAfter for StreamingReply."""
    try:
        await sent.edit(content=text)
    except discord.RateLimited as limited:
        raise RetryAfter(limited.retry_after) from None
    except discord.HTTPException as exc:
        if exc.status != 429:
            raise
        raise RetryAfter(_retry_after(exc)) from None


def _retry_after(exc: discord.HTTPException) -> float:
    headers: Union[dict, Any] = getattr(exc.response, "headers", None) or {}
    for header in ("Retry-After", "X-RateLimit-Reset-After"):
        try:
            return max(0.0, float(headers.get(header)))
        except (TypeError, ValueError):
            continue
    return 1.0


@hookimpl
def chatforge_register_adapters(register) -> None:
    register(DiscordAdapter)
