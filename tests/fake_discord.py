"""A fake Discord (REST API + gateway websocket) on 127.0.0.1, for driving a real discord.py client.

It runs aiohttp in a background thread with its own event loop, so a test can
start `chatforge run` as a subprocess and talk to it from ordinary (blocking)
test code: `dispatch_*` sends gateway events, `wait_for` waits (always with a
timeout) until the bot has made a matching request, and `requests` records
every REST call the bot made.

What it speaks (what discord.py 2.7 needs):
- REST under /api/v10: GET users/@me and oauth2/applications/@me (login; a
  wrong token gets 401), GET gateway and gateway/bot, PUT
  applications/{id}/commands (slash-command sync), POST/PATCH
  channels/{id}/messages, POST channels/{id}/typing, POST
  interactions/{id}/{token}/callback and webhooks/{app}/{token} (follow-ups).
  JSON responses carry `Content-Type: application/json` exactly: discord.py
  parses nothing else.
- The gateway at ws://127.0.0.1:PORT/gateway: HELLO, heartbeat ACK, IDENTIFY ->
  READY + GUILD_CREATE (one guild with two text channels), RESUME -> RESUMED,
  plain-text JSON frames (no zlib, which discord.py accepts).
- Shards, as Discord has them: GET gateway/bot says `shard_count`; any number of
  gateway connections at once, each IDENTIFY's `shard` ([id, count]) recorded;
  a connection identified as [id, count] gets only the guilds with
  (guild_id >> 22) % count == id (in READY, GUILD_CREATE and every guild event),
  and direct messages go to shard 0. With `shard_count` above 1 there is one
  guild per shard (`guild_on_shard`); GUILD_ID is on shard 1 of 2.
- Which process is which, when several bots share the fake: each may use its own
  prefix (`api_base_for("one")`, `gateway_url_for("one")`, as behind a proxy);
  requests and gateway connections record it as `via`.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

from loopback import LoopbackServer

API = "/api/v10"
BOT_ID = "900000000000000001"
APP_ID = "900000000000000002"
GUILD_ID = "900000000000000010"
CHANNEL_ID = "900000000000000011"
OTHER_CHANNEL_ID = "900000000000000012"
THREAD_ID = "900000000000000013"
DM_CHANNEL_ID = "900000000000000020"
TIMESTAMP = "2026-01-01T00:00:00.000000+00:00"


@dataclass
class Request:
    method: str
    path: str
    """Below /api/v10, e.g. /channels/123/messages."""
    body: Any
    at: float = field(default_factory=time.monotonic)
    status: int = 200
    via: str | None = None
    """The prefix the bot reached the fake by (`api_base_for(via)`), None without one."""


@dataclass
class Connection:
    """One gateway websocket."""

    ws: web.WebSocketResponse
    via: str | None
    shard: tuple[int, int] | None = None
    """[id, count] from IDENTIFY (or the session a RESUME names); (0, 1) for an unsharded IDENTIFY."""

    def owns(self, guild_id: str | None) -> bool:
        """Whether Discord sends this connection the events of `guild_id` (None: a direct message)."""
        if self.shard is None:
            return False
        shard_id, count = self.shard
        return shard_of(guild_id, count) == shard_id


def shard_of(guild_id: str | None, count: int) -> int:
    """The shard Discord sends a guild's events on; direct messages (None) come on shard 0."""
    return 0 if guild_id is None else (int(guild_id) >> 22) % count


def user(user_id: str, name: str, bot: bool = False) -> dict:
    return {"id": user_id, "username": name, "global_name": name.title(), "discriminator": "0",
            "avatar": None, "bot": bot, "public_flags": 0}


BOT_USER = user(BOT_ID, "forgebot", bot=True)


class FakeDiscord(LoopbackServer):
    name = "fake Discord"

    def __init__(self, token: str, heartbeat_interval_ms: int = 41250, shard_count: int = 1) -> None:
        super().__init__()
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.shard_count = shard_count
        """What GET /gateway/bot recommends; above 1, there is one guild on each shard."""
        self.guilds: dict[str, list[str]] = {GUILD_ID: [CHANNEL_ID, OTHER_CHANNEL_ID, THREAD_ID]}
        """Guild id -> its channels' and threads' ids."""
        for shard_id in range(shard_count):
            if shard_of(GUILD_ID, shard_count) != shard_id:
                high = (int(GUILD_ID) >> 22) + (shard_id - shard_of(GUILD_ID, shard_count)) % shard_count
                guild_id = (high << 22) + 10
                self.guilds[str(guild_id)] = [str(guild_id + 1)]
        self.requests: list[Request] = []
        self.gateway_log: list[tuple[str, Any]] = []
        """("identify" | "resume" | "heartbeat" | "connect" | "other", payload) in order."""
        self.connections = 0
        self.close_on_identify: int | None = None
        """Answer IDENTIFY by closing with this code (4014: intents refused; 4004: bad token)."""
        self.sockets: list[Connection] = []
        """Every gateway connection, in the order they were made."""
        self._sessions: dict[str, tuple[int, int]] = {}
        self._changed = threading.Condition()
        self._ids = itertools.count(910000000000000000)
        self._seq = itertools.count(1)
        self._edit_limits: list[tuple[float, bool]] = []
        self._ws: web.WebSocketResponse | None = None
        """The latest gateway connection (what `close_gateway` and `dispatch` use without a shard)."""

    # ------------------------------------------------------------ lifecycle

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def api_base_for(self, via: str) -> str:
        """The REST API under a prefix of its own, so that requests say which bot made them (`Request.via`)."""
        return f"http://127.0.0.1:{self.port}/{via}{API}"

    def gateway_url_for(self, via: str) -> str:
        return f"ws://127.0.0.1:{self.port}/{via}/gateway"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        app.router.add_get("/{via:[a-z0-9-]+}/gateway", self._gateway)
        app.router.add_route("*", "/{via:[a-z0-9-]+}" + API + "/{tail:.*}", self._rest)
        return app

    async def before_stop(self) -> None:
        for connection in list(self.sockets):
            if not connection.ws.closed:
                await connection.ws.close(code=1001)

    # ------------------------------------------------------------ waiting and inspecting

    def _record(self, kind: str, payload: Any) -> None:
        with self._changed:
            self.gateway_log.append((kind, payload))
            self._changed.notify_all()

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        """Wait (at most `timeout` s) until `condition()` is truthy; return its value or raise AssertionError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = condition()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._changed.wait(min(left, 0.2))

    def find(self, method: str, pattern: str, since: int = 0,
             where: Callable[[Request], bool] = lambda request: True) -> list[Request]:
        """Recorded requests (from index `since`) with this method whose path matches `pattern` fully."""
        with self._changed:
            return [r for r in self.requests[since:] if r.method == method and re.fullmatch(pattern, r.path)
                    and where(r)]

    def wait_for(self, method: str, pattern: str, since: int = 0, count: int = 1, timeout: float = 30,
                 where: Callable[[Request], bool] = lambda request: True) -> list[Request]:
        return self.wait_until(lambda: (found := self.find(method, pattern, since, where)) and len(found) >= count
                               and found, timeout, f"{count} x {method} {pattern}")

    def mark(self) -> int:
        """An index into `requests`: pass it as `since` to look only at what comes after."""
        with self._changed:
            return len(self.requests)

    def sent_messages(self, channel_id: str, since: int = 0) -> list[Request]:
        return self.find("POST", rf"/channels/{channel_id}/messages", since)

    def identifies(self) -> int:
        return sum(kind == "identify" for kind, _ in self.gateway_log)

    def resumes(self) -> int:
        return sum(kind == "resume" for kind, _ in self.gateway_log)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the bot has identified and received READY and the guild."""
        self.wait_until(lambda: any(kind == "ready-sent" for kind, _ in self.gateway_log), timeout, "IDENTIFY")

    def identified_shards(self, via: str | None = None) -> list[list[int] | None]:
        """The `shard` field of every IDENTIFY (None when unsharded), in order; only those via `via` if given."""
        return [payload["shard"] for kind, payload in self.gateway_log
                if kind == "identify" and (via is None or payload["via"] == via)]

    def ready_shards(self, via: str | None = None) -> set[int]:
        """The shard ids that were sent READY (and their guilds); only to connections via `via` if given."""
        return {payload["shard"][0] for kind, payload in self.gateway_log
                if kind == "ready-sent" and (via is None or payload["via"] == via)}

    def guild_on_shard(self, shard_id: int) -> tuple[str, str]:
        """(guild id, a text channel's id) of the guild on this shard (of `shard_count`)."""
        for guild_id, channels in self.guilds.items():
            if shard_of(guild_id, self.shard_count) == shard_id:
                return guild_id, channels[0]
        raise AssertionError(f"no guild on shard {shard_id} of {self.shard_count}")

    def guild_of(self, channel_id: str) -> str | None:
        """The guild a channel or thread is in; None for a direct message channel."""
        return next((guild_id for guild_id, channels in self.guilds.items() if channel_id in channels), None)

    # ------------------------------------------------------------ controlling

    def rate_limit_edits(self, times: int, retry_after: float, via: bool = False) -> None:
        """Answer the next `times` message edits with 429 and `retry_after`.

        With `via=True` the 429 looks like Discord's own (a `Via` header), which
        discord.py waits out by itself; without it discord.py raises
        HTTPException(429), as for a 429 from Discord's edge, and the adapter's
        own handling (RetryAfter) is what waits.
        """
        with self._changed:
            self._edit_limits += [(retry_after, via)] * times

    def close_gateway(self, code: int = 4000) -> None:
        """Close the bot's websocket; 4000 makes discord.py reconnect and RESUME."""
        ws = self._ws
        assert ws is not None, "no gateway connection"
        self._call(ws.close(code=code, message=b"fake close"))

    def dispatch(self, event: str, data: dict, shard: int | None = None) -> None:
        """Send a dispatch on the gateway connection(s) Discord would: those whose shard owns `data`'s guild
        (direct messages: shard 0); with `shard`, on that shard's connection(s), whoever owns the guild."""
        with self._changed:
            open_ones = [connection for connection in self.sockets if not connection.ws.closed]
        if shard is not None:
            matching = [c for c in open_ones if c.shard is not None and c.shard[0] == shard]
        else:
            matching = [c for c in open_ones if c.owns(data.get("guild_id"))]
        if not matching and shard is None and len(open_ones) == 1:
            matching = open_ones  # one connection, not identified yet: the old behaviour
        latest = {(c.via, c.shard): c for c in matching}  # a shard's newest connection, not one closing
        targets = list(latest.values())
        assert targets, f"no gateway connection for {event} (shard {shard}, guild {data.get('guild_id')})"
        frame = json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data})
        for connection in targets:
            self._call(connection.ws.send_str(frame))

    def new_id(self) -> str:
        return str(next(self._ids))

    def message_payload(self, author: dict, content: str, channel_id: str, guild: bool,
                        mentions: list[dict] | None = None) -> dict:
        """A message; `guild`: in the guild that has `channel_id` (GUILD_ID for a channel it does not know)."""
        payload = {
            "id": self.new_id(), "channel_id": channel_id, "author": author, "content": content,
            "timestamp": TIMESTAMP, "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": mentions or [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "type": 0, "flags": 0,
        }
        if guild:
            payload["guild_id"] = self.guild_of(channel_id) or GUILD_ID
            payload["member"] = {"roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False,
                                 "nick": None, "flags": 0}
        return payload

    def dispatch_message(self, text: str, author: dict, channel_id: str = CHANNEL_ID,
                         mention: bool = False, shard: int | None = None) -> str:
        """A MESSAGE_CREATE in the guild; `mention` prefixes the bot's @mention. Returns the message id."""
        content = f"<@{BOT_ID}> {text}" if mention else text
        payload = self.message_payload(author, content, channel_id, guild=True,
                                       mentions=[BOT_USER] if mention else [])
        self.dispatch("MESSAGE_CREATE", payload, shard)
        return payload["id"]

    def dispatch_dm(self, text: str, author: dict, channel_id: str = DM_CHANNEL_ID) -> str:
        payload = self.message_payload(author, text, channel_id, guild=False)
        self.dispatch("MESSAGE_CREATE", payload)
        return payload["id"]

    def dispatch_slash(self, name: str, author: dict, args: str | None = None,
                       channel_id: str = CHANNEL_ID) -> tuple[str, str]:
        """An INTERACTION_CREATE for the slash command /name; returns (interaction id, token)."""
        interaction_id, token = self.new_id(), f"interaction-token-{self.new_id()}"
        guild_id = self.guild_of(channel_id) or GUILD_ID
        data: dict[str, Any] = {"id": self.new_id(), "name": name, "type": 1}
        if args is not None:
            data["options"] = [{"name": "args", "type": 3, "value": args}]
        self.dispatch("INTERACTION_CREATE", {
            "id": interaction_id, "application_id": APP_ID, "type": 2, "data": data, "guild_id": guild_id,
            "channel_id": channel_id, "channel": {**text_channel(channel_id, "general"), "guild_id": guild_id},
            "member": {"user": author, "roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False,
                       "nick": None, "flags": 0, "permissions": "2248473465835073"},
            "token": token, "version": 1, "locale": "en-US", "guild_locale": "en-US",
            "app_permissions": "2248473465835073", "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id}, "context": 0,
            "attachment_size_limit": 8388608,
        })
        return interaction_id, token

    # ------------------------------------------------------------ REST

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        via = request.match_info.get("via")
        path = "/" + request.match_info["tail"]
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = Request(request.method, path, body, via=via)
        response = self._answer_rest(request, record)
        record.status = response.status
        with self._changed:
            self.requests.append(record)
            self._changed.notify_all()
        return response

    def _answer_rest(self, request: web.Request, record: Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bot {self.token}" and not record.path.startswith(
                ("/interactions/", "/webhooks/")):
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        method, path, body = record.method, record.path, record.body
        if method == "GET" and path == "/users/@me":
            return json_response(BOT_USER)
        if method == "GET" and path == "/oauth2/applications/@me":
            return json_response({
                "id": APP_ID, "name": "forgebot", "icon": None, "description": "", "summary": "",
                "rpc_origins": [], "bot_public": True, "bot_require_code_grant": False,
                "owner": user("900000000000000099", "owner"), "verify_key": "0" * 64, "flags": 0,
                "bot": BOT_USER, "team": None,
            })
        if method == "GET" and path in ("/gateway", "/gateway/bot"):
            url = self.gateway_url_for(record.via) if record.via else self.gateway_url
            return json_response({"url": url, "shards": self.shard_count,
                                  "session_start_limit": {"total": 1000, "remaining": 999,
                                                          "reset_after": 0, "max_concurrency": 1}})
        if method == "PUT" and re.fullmatch(rf"/applications/{APP_ID}/commands", path):
            return json_response([{"id": self.new_id(), "application_id": APP_ID, "version": "1", "type": 1,
                                   "default_member_permissions": None, "dm_permission": True, "nsfw": False,
                                   "options": [], **command} for command in body or []])
        if match := re.fullmatch(r"/channels/(\d+)/typing", path):
            return web.Response(status=204)
        if method == "POST" and (match := re.fullmatch(r"/channels/(\d+)/messages", path)):
            return json_response(self._bot_message(match.group(1), body))
        if method == "PATCH" and (match := re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path)):
            with self._changed:
                limit = self._edit_limits.pop(0) if self._edit_limits else None
            if limit is not None:
                retry_after, via = limit
                headers = {"Retry-After": str(retry_after), "X-RateLimit-Limit": "5",
                           "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": str(retry_after),
                           "X-RateLimit-Scope": "user"}
                if via:
                    headers["Via"] = "1.1 google"
                return json_response({"message": "You are being rate limited.", "retry_after": retry_after,
                                      "global": False}, 429, headers)
            return json_response(self._bot_message(match.group(1), body, match.group(2)))
        if method == "POST" and (match := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path)):
            kind = (body or {}).get("type")
            return json_response({"interaction": {"id": match.group(1), "type": 2,
                                                  "response_message_id": self.new_id(),
                                                  "response_message_loading": kind == 5,
                                                  "response_message_ephemeral": False}})
        if method == "POST" and re.fullmatch(rf"/webhooks/{APP_ID}/[^/]+", path):
            return json_response(self._bot_message(CHANNEL_ID, body))
        return json_response({"message": f"404: Not Found ({method} {path})", "code": 0}, 404)

    def _bot_message(self, channel_id: str, body: Any, message_id: str | None = None) -> dict:
        payload = self.message_payload(BOT_USER, (body or {}).get("content") or "", channel_id,
                                       guild=channel_id != DM_CHANNEL_ID)
        payload.pop("member", None)
        if message_id:
            payload["id"] = message_id
            payload["edited_timestamp"] = TIMESTAMP
        return payload

    # ------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        via = request.match_info.get("via")
        connection = Connection(ws, via)
        with self._changed:
            self.sockets.append(connection)
        self._ws = ws
        self.connections += 1
        self._record("connect", {**request.query, "via": via})
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}))
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            op, data = payload.get("op"), payload.get("d")
            if op == 1:
                self._record("heartbeat", data)
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                shard = data.get("shard")
                self._record("identify", {"intents": data.get("intents"), "shard": shard, "via": via})
                if data.get("token") != self.token or self.close_on_identify == 4004:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                if self.close_on_identify:
                    await ws.close(code=self.close_on_identify, message=b"Closed by the fake.")
                    break
                if shard is not None and not (isinstance(shard, list) and len(shard) == 2
                                              and 0 <= shard[0] < shard[1]):
                    await ws.close(code=4010, message=b"Invalid shard.")
                    break
                connection.shard = (shard[0], shard[1]) if shard is not None else (0, 1)
                await self._send_ready(connection)
            elif op == 6:
                session_id = data.get("session_id")
                self._record("resume", {"seq": data.get("seq"), "session_id": session_id})
                connection.shard = self._sessions.get(session_id, (0, 1))
                await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": next(self._seq), "d": {}}))
            else:
                self._record("other", payload)
        if self._ws is ws:
            self._ws = None
        return ws

    async def _send_ready(self, connection: Connection) -> None:
        ws, shard = connection.ws, connection.shard
        guild_ids = [guild_id for guild_id in self.guilds if connection.owns(guild_id)]
        session_id = f"session-{self.new_id()}"
        self._sessions[session_id] = shard
        resume_url = self.gateway_url_for(connection.via) if connection.via else self.gateway_url
        ready = {"v": 10, "user": BOT_USER, "guilds": [{"id": guild_id, "unavailable": True} for guild_id in guild_ids],
                 "session_id": session_id, "resume_gateway_url": resume_url,
                 "shard": list(shard), "application": {"id": APP_ID, "flags": 0}, "private_channels": [],
                 "relationships": [], "presences": [], "guild_join_requests": [], "geo_ordered_rtc_regions": []}
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": ready}))
        for guild_id in guild_ids:
            await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": next(self._seq),
                                          "d": guild(guild_id, self.guilds[guild_id])}))
        self._record("ready-sent", {"shard": list(shard), "via": connection.via, "guilds": guild_ids})


def text_channel(channel_id: str, name: str) -> dict:
    return {"id": channel_id, "type": 0, "name": name, "position": 0, "permission_overwrites": [],
            "nsfw": False, "topic": None, "parent_id": None, "rate_limit_per_user": 0, "last_message_id": None}


def guild(guild_id: str = GUILD_ID, channels: list[str] | None = None) -> dict:
    """GUILD_ID with its channels and thread, or another guild with one text channel per id in `channels`."""
    if guild_id == GUILD_ID:
        texts = [text_channel(CHANNEL_ID, "general"), text_channel(OTHER_CHANNEL_ID, "random")]
        threads = [{"id": THREAD_ID, "type": 11, "name": "a thread", "guild_id": GUILD_ID,
                    "parent_id": CHANNEL_ID, "owner_id": "900000000000000099", "last_message_id": None,
                    "rate_limit_per_user": 0, "message_count": 0, "member_count": 1, "flags": 0,
                    "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                        "archive_timestamp": TIMESTAMP, "locked": False}}]
    else:
        texts = [text_channel(channel_id, f"general-{n}") for n, channel_id in enumerate(channels or [])]
        threads = []
    return {
        "id": guild_id, "name": f"Test Guild {guild_id[-4:]}" if guild_id != GUILD_ID else "Test Guild", "icon": None, "splash": None, "discovery_splash": None,
        "owner_id": "900000000000000099", "afk_channel_id": None, "afk_timeout": 300,
        "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
        "roles": [{"id": guild_id, "name": "@everyone", "permissions": "2248473465835073", "position": 0,
                   "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
        "emojis": [], "stickers": [], "features": [], "mfa_level": 0, "application_id": None,
        "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
        "vanity_url_code": None, "description": None, "banner": None, "premium_tier": 0,
        "preferred_locale": "en-US", "public_updates_channel_id": None, "nsfw_level": 0,
        "premium_progress_bar_enabled": False, "joined_at": TIMESTAMP, "large": False, "unavailable": False,
        "member_count": 4, "voice_states": [], "presences": [], "stage_instances": [],
        "guild_scheduled_events": [], "soundboard_sounds": [],
        "members": [{"user": BOT_USER, "roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False,
                     "nick": None, "flags": 0}],
        "channels": texts,
        "threads": threads,
    }


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    """JSON with `Content-Type: application/json` exactly (discord.py ignores `; charset=utf-8`)."""
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})
