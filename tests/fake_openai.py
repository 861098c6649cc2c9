"""A small fake OpenAI-compatible model server on 127.0.0.1, for driving the real `openai` client.

It answers `POST /v1/chat/completions` (server-sent events or one JSON body)
with "You said: <last user message>" and usage, and `GET /v1/models`. Tests
script what the next requests get with `will("429", "ok")`, and assert on
every request it saw (messages, headers), on how many were in flight at once,
and on whether the client hung up. Every wait in here is bounded.

The event stream is what the client's parser expects (openai/_streaming.py):
`data: <json>` events separated by blank lines, a last chunk with
`finish_reason`, a usage chunk with no choices when the client asks for it in
`stream_options`, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from loopback import LoopbackServer

MODEL = "fake-model"
HANG_LIMIT = 30.0
"""A hanging request gives up after this long even if the client never hangs up."""

BEHAVIOURS = {
    "ok",              # a normal answer, streamed or not as the request asks
    "429",             # HTTP 429 with Retry-After: `retry_after`
    "500",             # HTTP 500
    "401",             # HTTP 401 (a wrong key)
    "hang",            # never answers (until the client hangs up)
    "hang_mid",        # sends the first piece of a streamed reply, then nothing
    "malformed",       # one good piece, then an event that is not JSON
    "cut",             # a few pieces, then the body ends: no finish_reason, no [DONE]
    "abort",           # one piece, then the connection is closed
    "error_event",     # one piece, then an in-stream {"error": ...} event
    "length",          # a normal answer whose finish_reason is "length" (max_tokens cut it)
}


@dataclass
class Request:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    behaviour: str
    at: float = field(default_factory=time.monotonic)
    disconnected: bool = False
    """The client hung up before the fake had finished answering."""

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])


class FakeOpenAI(LoopbackServer):
    name = "fake OpenAI server"

    def __init__(self, chunk_delay: float = 0.0, retry_after: str = "1") -> None:
        super().__init__()
        self.chunk_delay = chunk_delay
        """Seconds between two pieces of a streamed reply (and before a non-streamed one)."""
        self.retry_after = retry_after
        self.accepts_stream_options = True
        """False: answer HTTP 400 to a request with `stream_options`, as some older servers do."""
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: list[str] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    # ------------------------------------------------------------ what tests drive

    def will(self, *behaviours: str) -> None:
        """What the next requests get, in order; after these, "ok"."""
        unknown = set(behaviours) - BEHAVIOURS
        assert not unknown, f"unknown behaviours {unknown}"
        with self._lock:
            self._script += behaviours

    def chat_requests(self) -> list[Request]:
        with self._lock:
            return [request for request in self.requests if request.path.endswith("/chat/completions")]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        """Poll `predicate` until it is truthy (returns its value) or fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)

    # ------------------------------------------------------------ the API

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, {}, "ok")
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1, "owned_by": "test"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            behaviour = self._script.pop(0) if self._script else "ok"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        record = self._record(request, body, behaviour)
        try:
            return await self._answer(request, body, behaviour, record)
        except (ConnectionError, asyncio.CancelledError):
            record.disconnected = True
            raise
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any], behaviour: str,
                      record: Request) -> web.StreamResponse:
        if behaviour == "429":
            return _error(429, "slow down", {"Retry-After": self.retry_after})
        if behaviour == "500":
            return _error(500, "the model crashed")
        if behaviour == "401":
            return _error(401, "invalid api key")
        if not self.accepts_stream_options and "stream_options" in body:
            return _error(400, "unknown field: stream_options")
        if behaviour == "hang":
            await self._until_hung_up(request, record, HANG_LIMIT)
            return web.Response(status=504)
        pieces = _reply_pieces(body)
        if not body.get("stream"):
            await asyncio.sleep(self.chunk_delay)
            return web.json_response(_completion(body, "".join(pieces), behaviour))

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await self._event(response, _chunk({"role": "assistant", "content": ""}))
        for index, piece in enumerate(pieces):
            await self._event(response, _chunk({"content": piece}))
            if index == 0 and behaviour == "hang_mid":
                await self._until_hung_up(request, record, HANG_LIMIT)
                return response
            if index == 0 and behaviour == "malformed":
                await response.write(b"data: {not json\n\n")
                return response
            if index == 0 and behaviour == "abort":
                request.transport.close()
                return response
            if index == 0 and behaviour == "error_event":
                await self._event(response, {"error": {"message": "the model is overloaded"}})
                return response
            if index == 1 and behaviour == "cut":
                return response
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            if request.transport is None or request.transport.is_closing():
                record.disconnected = True
                return response
        await self._event(response, _chunk({}, "length" if behaviour == "length" else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await self._event(response, {**_chunk({}), "choices": [], "usage": _usage(body, pieces)})
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _event(self, response: web.StreamResponse, data: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(data)}\n\n".encode())

    async def _until_hung_up(self, request: web.Request, record: Request, limit: float) -> None:
        """Answer nothing until the client closes the connection (noted in `record`), at most `limit` s."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if request.transport is None or request.transport.is_closing():
                record.disconnected = True
                return
            await asyncio.sleep(0.02)

    def _record(self, request: web.Request, body: dict[str, Any], behaviour: str) -> Request:
        record = Request(request.method, request.path, dict(request.headers), body, behaviour)
        with self._lock:
            self.requests.append(record)
        return record


def _reply_pieces(body: dict[str, Any]) -> list[str]:
    """The reply, word by word: "You said: " and the last user message."""
    last_user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    words = f"You said: {last_user}".split(" ")
    return [word if index == 0 else " " + word for index, word in enumerate(words)]


def _usage(body: dict[str, Any], pieces: list[str]) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", ""))) // 4 + 1 for m in body.get("messages", []))
    return {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _completion(body: dict[str, Any], text: str, behaviour: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if behaviour == "length" else "stop"}],
            "usage": _usage(body, text.split(" "))}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "fake_error"}}, status=status,
                             headers=headers)
