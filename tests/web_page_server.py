"""Servers for the web page's browser tests (tests/test_web_page.py), each on its own thread and event loop.

`FakeChatApi` is a test double of the HTTP adapter's API (the contract the page is written against):
it serves the real static files with the contract's Content-Security-Policy, and answers each message
with what the test scripted for it (streamed pieces, a replacement, an error chunk, an HTTP error, a cut
connection), or else "echo: <text>" word by word. It records every request so that tests can check what
the page sent. `AdapterServer` runs the real `chatforge.adapters.http.HttpAdapter` on a test bot.

Both bind 127.0.0.1 on a free port; start() and stop() wait at most a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

STATIC = Path(__file__).resolve().parent.parent / "adapters" / "http_static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
START_TIMEOUT = 20.0


class LoopThread:
    """An event loop on a daemon thread: `start(setup)` runs setup() on it, `stop(teardown)` runs teardown()
    and ends the thread. Both wait at most `timeout` seconds."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def start(self, setup: Callable[[], Awaitable[Any]], timeout: float = START_TIMEOUT) -> Any:
        self.thread.start()
        return self.call(setup, timeout)

    def call(self, function: Callable[[], Awaitable[Any]], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(function(), self.loop).result(timeout)

    def stop(self, teardown: Callable[[], Awaitable[Any]], timeout: float = START_TIMEOUT) -> None:
        try:
            if self.thread.is_alive():
                self.call(teardown, timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)


@dataclass
class Script:
    """How the fake API answers one message text."""

    stream: list[str] = field(default_factory=list)
    """Content pieces, one chunk each."""
    replace: str | None = None
    """Sent as a last chunk's `chatforge.replace`."""
    error: str | None = None
    """Sent as an error chunk after the pieces (and then no [DONE])."""
    raw: list[str] = field(default_factory=list)
    """Sent as they are, each as one event's data, after the pieces (to send what is not a chunk)."""
    pause: float = 0.0
    """Seconds to wait after the pieces before the end (to look at the page while a reply streams)."""
    cut: bool = False
    """Close the connection after the pieces, without [DONE]."""
    status: int = 200
    """Not 200: answer with this status and the contract's error JSON (`message`, `code`), and `headers`."""
    message: str = ""
    code: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeChatApi:
    """The HTTP adapter's API as the contract describes it, with scripted answers (see the module's doc)."""

    def __init__(self, model: str = "testbot", api_key: str | None = None,
                 commands: list[dict[str, str]] | None = None) -> None:
        self.model = model
        self.api_key = api_key
        self.commands = commands if commands is not None else [
            {"name": "help", "usage": "", "help": "list the commands", "signature": "/help"},
            {"name": "roll", "usage": "<dice>", "help": "roll dice, e.g. 2d6", "signature": "/roll <dice>"},
        ]
        self.scripts: dict[str, Script] = {}
        self.requests: list[Recorded] = []
        self.port = 0
        self._thread = LoopThread("fake-chat-api")
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def script(self, text: str, **how: Any) -> None:
        """Answer the message `text` as `Script(**how)` says."""
        self.scripts[text] = Script(**how)

    def chats(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeChatApi:
        self._thread.start(self._start)
        return self

    def stop(self) -> None:
        self._thread.stop(self._stop)

    def __enter__(self) -> FakeChatApi:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.on_response_prepare.append(self._add_csp)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/commands", self._commands)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ handlers

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body))
        if request.path.startswith("/v1/") and self.api_key is not None and \
                request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Invalid API key.", "invalid_api_key", "invalid_request_error")
        return await handler(request)

    @staticmethod
    async def _add_csp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Content-Security-Policy"] = CSP

    @staticmethod
    def _error(status: int, message: str, code: str, kind: str = "invalid_request_error",
               headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                                 status=status, headers=headers)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 1700000000, "owned_by": "chatforge"}]})

    async def _commands(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"prefix": "/", "commands": self.commands})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = self.requests[-1].body
        text = body["messages"][-1]["content"]
        script = self.scripts.get(text)
        if script is None:  # echo word by word, as chatforge.testing's FakeGenerator does
            words = f"echo: {text}".split(" ")
            script = Script(stream=[word if i == 0 else " " + word for i, word in enumerate(words)])
        if script.status != 200:
            return self._error(script.status, script.message, script.code, headers=script.headers)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> bytes:
            data = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": created,
                    "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        await response.write(b": keep-alive\n\n")
        await response.write(chunk({"role": "assistant"}))
        for piece in script.stream:
            data = chunk({"content": piece})
            # Split each event in the middle (inside a UTF-8 character, when there is one): the page must
            # put lines back together across reads.
            middle = len(data) // 2
            await response.write(data[:middle])
            await asyncio.sleep(0.005)
            await response.write(data[middle:])
        for data in script.raw:
            await response.write(f"data: {data}\n\n".encode())
        if script.pause:
            await asyncio.sleep(script.pause)
        if script.error is not None:
            await response.write(f"data: {json.dumps({'error': {'message': script.error, 'type': 'server_error'}})}"
                                 "\n\n".encode())
            return response
        if script.cut:
            # Drop the connection mid-stream, as a crashed server or a cut network would; a moment after the
            # last piece, since Chromium drops what a fetch had received but not yet read when it errors.
            await asyncio.sleep(0.3)
            request.transport.close()
            return response
        if script.replace is not None:
            await response.write(chunk({}, chatforge={"replace": script.replace}))
        await response.write(chunk({}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class AdapterServer:
    """The real HTTP adapter (chatforge.adapters.http) serving a `chatforge.testing.make_bot` bot.

    `bot_config` is the bot's config (as make_bot takes it), `config` the adapter's (`adapters.http`)."""

    def __init__(self, bot_config: dict[str, Any] | None = None, **config: Any) -> None:
        self.bot_config = bot_config
        self.config = config
        self.bot: Any = None
        self.adapter: Any = None
        self.port = 0
        self._task: asyncio.Task | None = None
        self._thread = LoopThread("http-adapter")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> AdapterServer:
        try:
            self._thread.start(self._start)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._thread.stop(self._stop)

    def __enter__(self) -> AdapterServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _start(self) -> None:
        from chatforge.adapters.http import HttpAdapter
        from chatforge.testing import make_bot

        self.bot = make_bot(self.bot_config)
        options = {"enabled": True, "port": 0, "listen": "127.0.0.1", **self.config}
        self.adapter = HttpAdapter(self.bot.engine, HttpAdapter.Config(**options))
        self._task = asyncio.create_task(self.adapter.run())
        started = asyncio.create_task(self.adapter.started.wait())
        await asyncio.wait({started, self._task}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            started.cancel()
            self._task.result()  # raises what run() raised
            raise RuntimeError("HttpAdapter.run() returned before it started")
        if not started.done():
            started.cancel()
            raise TimeoutError(f"HttpAdapter did not start within {START_TIMEOUT} s")
        self.port = self.adapter.port

    async def _stop(self) -> None:
        try:
            if self._task is not None and not self._task.done():
                await self.adapter.stop()
                await asyncio.wait_for(self._task, START_TIMEOUT)
        finally:
            if self.bot is not None:
                await self.bot.engine.close()
