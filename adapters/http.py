"""HTTP: chatforge as an OpenAI-compatible chat server, and a web chat page.

Whatever speaks the OpenAI chat-completions API (the `openai` package, Open
WebUI, LibreChat, editor extensions, curl) talks to the bot at
`http://LISTEN:PORT/v1`; a browser gets a chat page at `/`.

- `GET /v1/models`: the bot, as one model (`model`, the bot's name by default).
- `POST /v1/chat/completions`, with or without `stream: true` (server-sent
  events, as the `openai` client parses them). The request's last message is
  the user's new message and goes through the engine as any platform's does:
  commands, skills, hooks, the generator, memory. The earlier messages a
  client sends (most send the whole conversation every time) are stored as
  the conversation's start when the bot remembers nothing of it, and ignored
  otherwise: the bot's memory is the conversation. Sampling parameters
  (temperature, max_tokens...) are the bot's own, from its config.
- `GET /v1/commands`: the command list the page shows (what `/help` lists).

Who is talking: the API key (a digest of it; "local" without keys) plus the
request's `user` field or an `X-OpenWebUI-User-Id` header names the user;
`X-Chatforge-Conversation` or `X-OpenWebUI-Chat-Id` names the conversation
(without one, each user has one conversation). Ids are scoped by key, so a
key can never reach another key's conversations. Rate limits are the
engine's, per user, as on every platform.

Safety: without `api_keys` the server only listens on a loopback address; with
keys, every /v1 request without a valid one gets 401. Bodies are bounded in
size and time, replies in time, connections in number (`web_server`).
Refusals map to statuses: 400 (bad request, too long), 401, 404 (unknown
model), 413, 429 and 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from chatforge.adapter import Adapter
from chatforge.commands import parse_command
from chatforge.adapters.web_server import BodyTooLarge, BodyTooSlow, GuardedServer, read_body
from chatforge.engine import Admission
from chatforge.generation import Usage, measuring_usage
from chatforge.guard import clean_text
from chatforge.hookspecs import hookimpl
from chatforge.memory import Turn
from chatforge.message import Message, Reply

log = logging.getLogger("chatforge.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC = Path(__file__).with_name("http_static")
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The page's Content-Security-Policy: its own files only, so even a rendering bug cannot run injected script."""
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon"}
MAX_ID_LENGTH = 200
"""Characters of a user or conversation id a client may send."""
MIN_KEY_LENGTH = 16
FORGETTING_COMMANDS = {"reset", "forget"}
"""Commands after which a client's record of the conversation must not be taken back into memory."""
_HEADER_NAMES = re.compile(r"^[A-Za-z0-9-]+(\s*,\s*[A-Za-z0-9-]+)*$")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    api_keys: list[SecretStr] = []
    """Keys clients must send (Authorization: Bearer KEY); a list, or one string of comma-separated keys:
    api_keys: ${CHATFORGE_API_KEYS:-}. Never logged. None: no key is asked for, and `listen` must be loopback."""
    listen: str = "127.0.0.1"
    """The address to bind. Anything but a loopback address (0.0.0.0, a LAN address) needs api_keys."""
    port: int = Field(8000, ge=0, le=65535)
    """The port to bind (0: any free one)."""
    model: str = ""
    """The model id clients see and send; the bot's name (bot.name) when empty."""
    cors_origins: list[str] = []
    """Web origins (https://app.example.com) whose pages may call the API from a browser; "*" for any."""
    max_body_size: int = Field(1024 ** 2, ge=1024)
    """Bytes a request body may have (413 beyond)."""
    body_timeout: float = Field(10.0, gt=0)
    """Seconds a request body has to arrive (408 beyond)."""
    request_timeout: float = Field(300.0, gt=0)
    """Seconds a reply may take, from the request's arrival to its last word (504, or an error event, beyond)."""
    keepalive_interval: float = Field(15.0, gt=0)
    """Seconds between SSE comment lines while a streamed reply has nothing new (keeps proxies from closing it)."""
    max_connections: int = Field(100, ge=1)
    """Open connections at most; more are answered 503 and closed."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a connection has to send a request's headers."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_one_string(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: "key1,key2"
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _real_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            secret = key.get_secret_value()
            if len(secret) < MIN_KEY_LENGTH or any(char.isspace() for char in secret):
                raise ValueError(f"at least {MIN_KEY_LENGTH} characters each, with no spaces (make one with: "
                                 "python -c 'import secrets; print(secrets.token_urlsafe())')")
        return value

    @field_validator("listen")
    @classmethod
    def _open_only_with_keys(cls, value: str, info: ValidationInfo) -> str:
        if not _loopback(value) and "api_keys" in info.data and not info.data["api_keys"]:
            raise ValueError(f"a loopback address such as 127.0.0.1 unless api_keys is set: anyone who can reach "
                             f"{value} could use the bot (set api_keys: ${{CHATFORGE_API_KEYS}})")
        return value


class ApiError(Exception):
    """A request refused with an OpenAI-format error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 504:
            headers["x-should-retry"] = "false"  # the openai client would ask for the same slow reply twice more
        return web.json_response(self.body(), status=self.status, headers=headers)


class Caller:
    """Who sent a request: the key's digest (or "local"), the user named in it, and the conversation."""

    def __init__(self, principal: str, user: str, conversation: str) -> None:
        self.principal, self.user, self.conversation = principal, user, conversation

    def message(self, text: str) -> Message:
        user = f"{self.principal}:{self.user}" if self.user else self.principal
        conversation = self.conversation or self.user or "default"
        return Message(text=text, platform="http", chat=f"{self.principal}:{conversation}", user=user,
                       display_name=self.user, direct=True)


class HttpAdapter(Adapter):
    name = "http"
    Config = HttpConfig

    def __init__(self, engine, config: HttpConfig | None) -> None:
        super().__init__(engine, config or HttpConfig())
        self.model_id = self.config.model or engine.name
        self.started = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._requests = 0  # requests being served, bodies still arriving included
        self._idle = asyncio.Event()
        self._idle.set()
        self._keys = [(key.get_secret_value().encode(), _digest(key.get_secret_value()))
                      for key in self.config.api_keys]
        self._server: GuardedServer | None = None
        self._page_files = {path.name: path for path in STATIC.glob("*") if path.is_file()} if STATIC.is_dir() else {}

    @property
    def port(self) -> int:
        """The bound port (with port: 0, the one the system chose)."""
        assert self._server is not None
        return self._server.port

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        app = web.Application(client_max_size=self.config.max_body_size,
                              middlewares=[self._count, self._cors, self._errors, self._checks])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        app.router.add_get("/v1/commands", self._commands)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        server = self._server = GuardedServer(app, host=self.config.listen, port=self.config.port, logger=log,
                                              max_connections=self.config.max_connections,
                                              header_timeout=self.config.header_timeout)
        await server.start()
        try:
            self.started.set()
            keys = ("API keys " + ", ".join(digest for _, digest in self._keys)) if self._keys else "no API key"
            host = f"[{self.config.listen}]" if ":" in self.config.listen else self.config.listen
            self.announce(f"http://{host}:{server.port} (OpenAI API at /v1, chat page at /; {keys})")
            await self._stop_requested.wait()
            # Every request that got in is answered; `chatforge run` bounds the wait (bot.shutdown_timeout).
            await self._idle.wait()
            await self.wait_in_flight()  # replies whose client left go on to be remembered
        finally:
            await server.stop()

    async def stop(self) -> None:
        """Refuse new requests (503), let the replies in flight finish, then close."""
        self._stopping = True
        self._stop_requested.set()

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count the requests being served, so that stopping waits for each one that got in."""
        self._requests += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._requests -= 1
            if not self._requests:
                self._idle.set()

    @web.middleware
    async def _cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let the configured web origins call the API from a browser (preflights need no key)."""
        origin = self._allowed_origin(request)
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if origin is None:
                return web.Response(status=403)
            asked = request.headers.get("Access-Control-Request-Headers", "")
            response: web.StreamResponse = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                # What the client asks for (openai-node adds x-stainless-*, Open WebUI its own), if well formed.
                "Access-Control-Allow-Headers": asked if _HEADER_NAMES.fullmatch(asked) else "Authorization, Content-Type",
                "Access-Control-Max-Age": "600"})
        else:
            response = await handler(request)
        if origin is not None and not response.prepared:  # a stream was sent with them already
            _allow_origin(response, origin)
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every refusal in OpenAI's error format: ours, aiohttp's own (404, 405, 413), and our bugs (500)."""
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:
            if error.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status)
            return ApiError(error.status, error.reason or "error", code=code).response()
        except Exception:  # noqa: BLE001 - a bug (or a plugin failing under --strict): logged, and a proper 500
            log.exception("the HTTP adapter failed on %s %s", request.method, request.path)
            return ApiError(500, "The bot failed to answer; the error is in its log.", "server_error",
                            "internal_error").response()

    @web.middleware
    async def _checks(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """What a browser could be tricked into: another site's page posting to the bot (a form or fetch
        from a page the operator opened), or a DNS name rebound to 127.0.0.1 reading its answers."""
        if not self._keys and not _loopback(_hostname(request.host)):
            raise ApiError(403, "Without api_keys this server answers only requests addressed to a loopback "
                                "name (127.0.0.1, localhost).", code="forbidden_host")
        origin = request.headers.get("Origin")
        if origin is not None and self._allowed_origin(request) is None and not _same_origin(request, origin):
            raise ApiError(403, f"Requests from pages at {origin} are not allowed (adapters.http.cors_origins).",
                           code="forbidden_origin")
        if self._stopping and request.path.startswith("/v1/"):
            raise ApiError(503, "The bot is shutting down.", "server_error", "shutting_down", retry_after=5)
        return await handler(request)

    def _allowed_origin(self, request: web.Request) -> str | None:
        """The request's Origin if it is one of cors_origins."""
        origin = request.headers.get("Origin")
        if origin is not None and ("*" in self.config.cors_origins or origin in self.config.cors_origins):
            return origin
        return None

    # ------------------------------------------------------------ the page

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.StreamResponse:
        path = self._page_files.get(name)  # only the files shipped in http_static: no path is ever joined
        if path is None:
            raise ApiError(404, f"no file {name!r}", code="not_found")
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return web.Response(body=path.read_bytes(), content_type=content_type,
                            charset="utf-8" if content_type.startswith("text/") else None,
                            headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                                     "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    # ------------------------------------------------------------ the API

    def _principal(self, request: web.Request) -> str:
        """The key's digest, or "local" when no key is configured; 401 for a missing or wrong key."""
        if not self._keys:
            return "local"
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer" and given_bytes:
            match = None
            for key, digest in self._keys:  # every key compared, in constant time: no timing tells which
                if hmac.compare_digest(given_bytes, key):
                    match = digest
            if match is not None:
                return match
        detail = "No API key given" if not header else "Incorrect API key"
        raise ApiError(401, f"{detail}: send Authorization: Bearer KEY, with one of adapters.http.api_keys.",
                       code="invalid_api_key")

    def _caller(self, request: web.Request, body: dict[str, Any] | None = None, principal: str | None = None
                ) -> Caller:
        """Who is asking (401 without a valid key, unless `principal` says the key was checked already)."""
        principal = principal or self._principal(request)
        user = _client_id((body or {}).get("user"), "user") or _client_id(
            request.headers.get("X-OpenWebUI-User-Id"), "X-OpenWebUI-User-Id")
        conversation = _client_id(request.headers.get("X-Chatforge-Conversation"), "X-Chatforge-Conversation") or \
            _client_id(request.headers.get("X-OpenWebUI-Chat-Id"), "X-OpenWebUI-Chat-Id")
        return Caller(principal, user, conversation)

    async def _models(self, request: web.Request) -> web.Response:
        self._principal(request)
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: web.Request) -> web.Response:
        self._principal(request)
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": int(self.engine.started_at),
                "owned_by": "chatforge"}

    def _check_model(self, model: Any) -> None:
        if model != self.model_id:
            raise ApiError(404, f"The model {model!r} does not exist: this server has one, {self.model_id!r}.",
                           code="model_not_found", param="model")

    async def _commands(self, request: web.Request) -> web.Response:
        """The commands /help lists for this caller (admins' ones only to admins)."""
        message = self._caller(request).message("")
        admin, prefix = self.engine.is_admin(message), self.engine.command_prefix
        commands = [{"name": command.name, "usage": command.usage, "help": command.help,
                     "signature": command.signature(prefix)}
                    for command in self.engine.commands if admin or not command.admin]
        return web.json_response({"prefix": prefix, "commands": commands})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        principal = self._principal(request)  # before the body is read: no key, no work
        if request.content_type != "application/json":  # a form or text/plain post could come from any site
            raise ApiError(415, "Send the request as JSON, with Content-Type: application/json.",
                           code="unsupported_media_type")
        body = await self._json_body(request)
        if "model" in body:
            self._check_model(body["model"])
        text, earlier_messages = _conversation(body)
        if body.get("n") not in (None, 1):
            raise ApiError(400, "Only one choice (n: 1) is made per request.", param="n")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false.", param="stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        message = self._caller(request, body, principal).message(text)
        earlier = self._earlier_turns(earlier_messages, message)
        admission = self.engine.admit(message)
        if not admission.admitted:
            raise _refusal(admission)
        completion = _Completion(self.model_id, prompt_text=text + "".join(m["text"] for m in earlier_messages))
        with measuring_usage() as usage:  # before the engine's task starts: it inherits the context
            if stream:
                pieces: asyncio.Queue[str] = asyncio.Queue()
                handling = self._start(admission, earlier, pieces.put_nowait)
                return await self._stream(request, handling, pieces, completion, usage, include_usage, received)
            handling = self._start(admission, earlier, None)
        reply = await self._within_time(handling, received)
        return web.json_response(completion.whole(reply, usage))

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await read_body(request, self.config.max_body_size, self.config.body_timeout)
        except BodyTooLarge:
            raise ApiError(413, f"The request is larger than {self.config.max_body_size:,} bytes "
                                "(adapters.http.max_body_size).", code="request_too_large") from None
        except BodyTooSlow:
            raise ApiError(408, f"The request's body did not arrive within {self.config.body_timeout:g} s.",
                           code="request_timeout") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.")
        return body

    def _earlier_turns(self, messages: list[dict[str, str]], message: Message) -> list[Turn]:
        """The client's record of the conversation, as turns: only what came after its last /reset or
        /forget (a client resends what the user asked the bot to forget), the newest memory.max_turns."""
        for index in range(len(messages) - 1, -1, -1):
            parsed = parse_command(messages[index]["text"].strip(), self.engine.command_prefix)
            if messages[index]["role"] == "user" and parsed is not None and parsed[0] in FORGETTING_COMMANDS:
                messages = messages[index + 1:]
                break
        while messages and messages[0]["role"] == "assistant":  # the command's answer, or a greeting
            messages = messages[1:]
        turns = []
        for earlier in messages[-self.engine.settings.memory.max_turns:]:
            text = clean_text(earlier["text"])[: self.engine.settings.limits.max_message_chars]
            if not text:
                continue
            if earlier["role"] == "user":
                turns.append(Turn("user", text, user=message.user, display_name=message.display_name))
            else:  # the client says the bot said it: context, never fine-tuning data (source is not the generator)
                turns.append(Turn("assistant", text, display_name=self.engine.name, meta={"source": "client"},
                                  reply_to=message.user))
        return turns

    def _start(self, admission: Admission, earlier: list[Turn], on_text: Callable[[str], None] | None
               ) -> asyncio.Task:
        """The engine at work on the message, tracked so that stopping waits for it. It goes on if the client
        leaves (the turn is remembered, as on any platform), and gives its place back when done."""
        handling = self.track(self.engine.handle(admission.message, on_text, admission=admission, earlier=earlier))
        handling.add_done_callback(lambda _: admission.release())
        return handling

    async def _within_time(self, handling: asyncio.Task, received: float) -> Reply | None:
        """The engine's reply within request_timeout (counted from the request's arrival), or a 504."""
        remaining = self.config.request_timeout - (time.monotonic() - received)
        try:
            return await asyncio.wait_for(asyncio.shield(handling), max(remaining, 0.001))
        except asyncio.TimeoutError:
            handling.cancel()
            raise ApiError(504, f"No reply within {self.config.request_timeout:g} s (adapters.http.request_timeout).",
                           "server_error", "timeout") from None

    async def _stream(self, request: web.Request, handling: asyncio.Task, pieces: asyncio.Queue[str],
                      completion: "_Completion", usage: Usage, include_usage: bool, received: float
                      ) -> web.StreamResponse:
        """Server-sent events: the reply's pieces as they come, comment lines while nothing comes."""
        answering = asyncio.ensure_future(self._within_time(handling, received))
        answering.add_done_callback(lambda task: task.cancelled() or task.exception())  # read, if the client left
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        origin = self._allowed_origin(request)
        if origin is not None:
            _allow_origin(response, origin)
        sent = []
        writer = _EventWriter(response)
        getting: asyncio.Future | None = None
        try:
            await response.prepare(request)
            await writer.event(completion.chunk({"role": "assistant", "content": ""}))
            while not answering.done():
                getting = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({getting, answering}, timeout=self.config.keepalive_interval,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getting in done:
                    piece = getting.result() + _drain(pieces)
                    sent.append(piece)
                    await writer.event(completion.chunk({"content": piece}))
                else:
                    getting.cancel()
                    if not done:
                        await writer.comment("keep-alive")
            piece = _drain(pieces)
            if piece:
                sent.append(piece)
                await writer.event(completion.chunk({"content": piece}))
            try:
                reply = answering.result()
            except ApiError as error:
                await writer.event(error.body())
                await writer.done()
                return response
            except Exception:  # noqa: BLE001 - the status is sent: the client is told in the stream
                log.exception("the HTTP adapter failed while answering a streamed request")
                await writer.event(ApiError(500, "The bot failed to answer; the error is in its log.",
                                            "server_error", "internal_error").body())
                await writer.done()
                return response
            final, streamed = (reply.text if reply else ""), "".join(sent)
            if final.startswith(streamed):
                if final[len(streamed):]:
                    await writer.event(completion.chunk({"content": final[len(streamed):]}))
            else:  # a plugin changed the reply after it streamed: the page shows the final text
                await writer.event(completion.chunk({}, chatforge={"replace": final}))
            await writer.event(completion.chunk({}, finish_reason="stop"))
            if include_usage:
                await writer.event(completion.usage_chunk(usage, final))
            await writer.done()
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # The client left: the reply is still made and remembered (it is tracked), but not sent.
            log.info("a client left before its reply was complete (%s)", type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if getting is not None:
                getting.cancel()
        return response


class _Completion:
    """One request's answer, whole or in chunks, in the shapes the openai client parses."""

    def __init__(self, model: str, prompt_text: str) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model, self.prompt_text = model, prompt_text

    def whole(self, reply: Reply | None, usage: Usage) -> dict[str, Any]:
        text = reply.text if reply else ""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": self._usage(usage, text)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

    def usage_chunk(self, usage: Usage, text: str) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": self._usage(usage, text)}

    def _usage(self, usage: Usage, text: str) -> dict[str, Any]:
        """The generator's counts; for an answer no generator made (a command), about 4 characters a token."""
        if usage.counted:
            prompt, completion, estimated = usage.prompt_tokens, usage.completion_tokens, {}
        else:
            prompt, completion = math.ceil(len(self.prompt_text) / 4), math.ceil(len(text) / 4)
            estimated = {"estimated": True}
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                **estimated}


class _EventWriter:
    """Writes server-sent events to a prepared response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def event(self, data: dict[str, Any]) -> None:
        await self.response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")

    async def comment(self, text: str) -> None:
        await self.response.write(f": {text}\n\n".encode())

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        with contextlib.suppress(ConnectionResetError):
            await self.response.write_eof()


def _drain(queue: asyncio.Queue[str]) -> str:
    """Everything queued already, joined: one event for what arrived while the last was being written."""
    pieces = []
    while not queue.empty():
        pieces.append(queue.get_nowait())
    return "".join(pieces)


def _allow_origin(response: web.StreamResponse, origin: str) -> None:
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    response.headers["Vary"] = "Origin"


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1"."""
    return urlsplit(f"//{host}").hostname or ""


def _same_origin(request: web.Request, origin: str) -> bool:
    """Whether the page that sent the request was served here: its origin names this host (as the client
    addressed it, or as the reverse proxy in front says it was addressed; a page cannot set either header)."""
    netloc = urlsplit(origin).netloc
    return bool(netloc) and netloc in (request.host, request.headers.get("X-Forwarded-Host"))


def _digest(key: str) -> str:
    """A stable, short name for a key in memory keys: never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _client_id(value: Any, where: str) -> str:
    """A user or conversation id a client sent: short, printable text, or a 400 saying what is wrong."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise ApiError(400, f"{where} must be printable text of at most {MAX_ID_LENGTH} characters.", param=where)
    return value


def _text_of(content: Any, index: int, strict: bool) -> str:
    """A message's text: a string, or the text parts of a list. Images and audio are not understood: in the
    message to answer that is a 400 (better than an answer that ignores the picture), in earlier ones they
    are skipped (one old picture must not make a whole chat fail)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif strict:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{index}].content: only text parts are understood, not {kind!r}.",
                               param=f"messages[{index}].content")
        return "\n".join(texts)
    if content is None:
        return ""
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts.",
                   param=f"messages[{index}].content")


def _conversation(body: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """The new user message, and the earlier user and assistant messages (system and tool ones are the bot's
    business: it has its own system prompt)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects.", param="messages")
    earlier = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant",
                                                                         "tool", "function"):
            raise ApiError(400, f"messages[{index}] must be an object with a role of system, user or assistant.",
                           param=f"messages[{index}]")
        text = _text_of(message.get("content"), index, strict=index == len(messages) - 1)
        if message["role"] in ("user", "assistant"):
            earlier.append({"role": message["role"], "text": text})
    last = messages[-1]
    if last["role"] != "user":
        raise ApiError(400, "The last message must be the user's: it is the one the bot answers.",
                       param=f"messages[{len(messages) - 1}]")
    return earlier[-1]["text"], earlier[:-1]


def _refusal(admission: Admission) -> ApiError:
    """The engine's refusal of a message as the status an API client acts on."""
    said = admission.refusal.text if admission.refusal else ""
    if admission.reason == "rate_limited":
        wait = admission.retry_after or 1
        return ApiError(429, f"You're sending messages faster than I can answer; please wait {math.ceil(wait)} s.",
                        "rate_limit_exceeded", "rate_limit_exceeded", retry_after=wait)
    if admission.reason == "busy":
        return ApiError(503, said or "The bot is busy answering a lot of messages; please try again shortly.",
                        "server_error", "server_busy", retry_after=admission.retry_after)
    if admission.reason == "too_long":
        return ApiError(400, said, code="message_too_long", param="messages")
    return ApiError(400, "The last user message is empty.", param="messages")


@hookimpl
def chatforge_register_adapters(register):
    register(HttpAdapter)
