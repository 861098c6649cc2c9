"""A small fake Telegram Bot API on 127.0.0.1, for driving the real python-telegram-bot client.

It runs an aiohttp server in a background thread with its own event loop, so
a test can start `chatforge run` as a subprocess and talk to it through this
server: enqueue incoming messages, inject failures, and assert on every call
the bot made (method and decoded parameters). Every wait is bounded.

Updates are fetched with getUpdates (polling), or, after `deliver(targets)`,
pushed like Telegram's webhook behind a load balancer: POSTed with the secret
of the last setWebhook call, round-robin across the workers' URLs, several in
flight, a failed POST retried on the next worker, and chosen updates
delivered a second time to another worker (a redelivery). While a webhook is
registered, getUpdates answers 409 as Telegram does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web

from loopback import LoopbackServer

log = logging.getLogger("fake_telegram")

BOT_ID = 777000111
BOT_USERNAME = "forge_test_bot"
LONG_POLL_MAX = 1.0
"""getUpdates waits at most this long, whatever timeout the client asks for."""

# Parameters PTB sends as plain strings; every other field is JSON-encoded by PTB.
_STRING_FIELDS = {"text", "caption", "url", "secret_token", "description", "short_description", "action"}


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str
    status: int = 200
    result: Any = None
    """What the fake answered (the sent Message for sendMessage)."""
    at: float = field(default_factory=time.monotonic)


@dataclass
class Delivery:
    """One POST of an update to a worker's webhook (push mode)."""

    update_id: int
    message_id: int
    target: int
    """Index of the worker's URL in `deliver(targets)`."""
    status: int
    """The worker's HTTP status; 0 when the connection failed."""
    redelivery: bool = False
    """A second delivery of an update a worker had already accepted (to another worker)."""
    at: float = field(default_factory=time.monotonic)


class FakeTelegram(LoopbackServer):
    name = "fake Telegram server"

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.calls: list[Call] = []
        self.unknown_methods: list[str] = []
        self._lock = threading.Lock()
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._get_updates_failures: list[int] = []
        self._edit_rate_limits: list[int] = []
        self.webhook: dict[str, Any] | None = None
        """The last setWebhook call's parameters (url, secret_token...), until deleteWebhook."""
        self.on_sent: Callable[[Call], None] | None = None
        """Called (on the server's loop; be quick) with each successful sendMessage call."""
        self.callback_errors: list[BaseException] = []
        self.deliveries: list[Delivery] = []
        self._push: asyncio.Queue | None = None  # push mode: updates waiting to be POSTed
        self._pusher: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # ------------------------------------------------------------ what tests drive

    def enqueue_message(self, text: str, *, chat_id: int, user_id: int, first_name: str = "Ann",
                        last_name: str | None = None, group: bool = False, is_bot: bool = False,
                        reply_to: dict[str, Any] | None = None, thread_id: int | None = None) -> dict[str, Any]:
        """Queue an incoming text message (private chat, or a supergroup with `group=True`); returns it."""
        user: dict[str, Any] = {"id": user_id, "is_bot": is_bot, "first_name": first_name,
                                "username": f"user{user_id}"}
        if last_name:
            user["last_name"] = last_name
        chat = ({"id": chat_id, "type": "supergroup", "title": "Test group"} if group
                else {"id": chat_id, "type": "private", "first_name": first_name})
        message: dict[str, Any] = {"message_id": next(self._message_ids), "date": int(time.time()),
                                   "chat": chat, "from": user, "text": text}
        entities = _entities(text)
        if entities:
            message["entities"] = entities
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
        with self._lock:
            update = {"update_id": next(self._update_ids), "message": message}
            if self._push is None:
                self._updates.append(update)
        if self._push is not None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._push.put_nowait, update)
        return message

    def deliver(self, targets: list[str], *, secret: str | None = None, in_flight: int = 20,
                redeliver: Callable[[int], float | None] = lambda update_id: None, attempts: int = 5) -> None:
        """From now on push updates to the workers' webhook URLs, as Telegram behind a load balancer would.

        Each update is POSTed to the next of `targets` in turn (round-robin), up to `in_flight` at once,
        with `secret` (default: the secret_token of the last setWebhook call) in the secret header. A POST
        that fails (an error status, a refused connection) is tried on the next worker, `attempts` times
        in all. `redeliver(update_id)` gives a delay in seconds after which an update a worker accepted
        is POSTed again to the next worker (Telegram's retry after a timeout), or None. Updates already
        waiting for getUpdates are pushed too.
        """
        if secret is None:
            assert self.webhook is not None, "deliver() before any setWebhook call: give the secret"
            secret = self.webhook.get("secret_token", "")
        self._call(self._start_pushing(list(targets), secret, in_flight, redeliver, attempts))

    def delivered(self, update_id: int) -> list[Delivery]:
        with self._lock:
            return [delivery for delivery in self.deliveries if delivery.update_id == update_id]

    async def _start_pushing(self, targets: list[str], secret: str, in_flight: int,
                             redeliver: Callable[[int], float | None], attempts: int) -> None:
        assert self._push is None, "already pushing"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._push = queue
            waiting, self._updates = self._updates, []
        for update in waiting:
            queue.put_nowait(update)
        self._pusher = asyncio.create_task(self._push_updates(queue, targets, secret, in_flight, redeliver,
                                                              attempts))

    async def _push_updates(self, queue: asyncio.Queue, targets: list[str], secret: str, in_flight: int,
                            redeliver: Callable[[int], float | None], attempts: int) -> None:
        turn = itertools.count()
        places = asyncio.Semaphore(in_flight)
        tasks: set[asyncio.Task] = set()
        timeout = aiohttp.ClientTimeout(total=10)
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret}

        async def post(session: aiohttp.ClientSession, update: dict[str, Any], target: int,
                       redelivery: bool) -> int:
            try:
                async with session.post(targets[target], json=update, headers=headers) as response:
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                status = 0
            with self._lock:
                self.deliveries.append(Delivery(update["update_id"], update["message"]["message_id"], target,
                                                status, redelivery))
            return status

        async def push(session: aiohttp.ClientSession, update: dict[str, Any]) -> None:
            try:
                target = next(turn) % len(targets)
                for attempt in range(attempts):
                    if await post(session, update, target, False) == 200:
                        break
                    target = (target + 1) % len(targets)
                    await asyncio.sleep(0.2)
                else:
                    log.warning("fake Telegram: gave up delivering update %s", update["update_id"])
                    return
            finally:
                places.release()
            delay = redeliver(update["update_id"])
            if delay is not None:
                await asyncio.sleep(delay)
                await post(session, update, (target + 1) % len(targets), True)

        # No proxy from the environment: the workers are on loopback.
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            try:
                while True:
                    update = await queue.get()
                    await places.acquire()
                    task = asyncio.create_task(push(session, update))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def before_stop(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
            await asyncio.gather(self._pusher, return_exceptions=True)

    def fail_get_updates(self, count: int, status: int = 502) -> None:
        """Answer the next `count` getUpdates calls with an HTTP error (500, 502...)."""
        with self._lock:
            self._get_updates_failures += [status] * count

    def rate_limit_edits(self, count: int, retry_after: int = 1) -> None:
        """Answer the next `count` editMessageText calls with 429 and `retry_after`."""
        with self._lock:
            self._edit_rate_limits += [retry_after] * count

    def calls_to(self, method: str, **where: Any) -> list[Call]:
        """The recorded calls of `method` (successful or not) whose params match `where`."""
        with self._lock:
            calls = list(self.calls)
        return [call for call in calls if call.method == method
                and all(call.params.get(key) == value for key, value in where.items())]

    def sent_messages(self, chat_id: int) -> list[Call]:
        return [call for call in self.calls_to("sendMessage", chat_id=chat_id) if call.status == 200]

    def count(self, method: str) -> int:
        return len(self.calls_to(method))

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        """Poll `predicate` until it is truthy (returns its value) or fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; calls: {self.summary()}")
            time.sleep(0.05)

    def wait_polls(self, more: int, timeout: float) -> None:
        """Wait until the bot has made `more` further getUpdates calls (so it has seen the queue)."""
        target = self.count("getUpdates") + more
        self.wait_for(lambda: self.count("getUpdates") >= target, timeout, f"{more} more getUpdates calls")

    def summary(self) -> str:
        with self._lock:
            calls = list(self.calls[-30:])
        return ", ".join(f"{call.method}[{call.status}]" for call in calls)

    # ------------------------------------------------------------ the Bot API

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        if not path.startswith("/bot") or path.count("/") != 2:
            return _error(404, "Not Found")
        token, method = path[len("/bot"):].split("/", 1)
        params = await _params(request)
        call = Call(method, params, token)
        with self._lock:
            self.calls.append(call)
        if token != self.token:
            call.status = 401
            return _error(401, "Unauthorized")
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            log.warning("fake Telegram: unknown method %s %s", method, params)
            with self._lock:
                self.unknown_methods.append(method)
            return _ok(True)
        response = await handler(params)
        call.status = response.status
        call.result = json.loads(response.body).get("result")
        if method == "sendMessage" and call.status == 200 and self.on_sent is not None:
            try:
                self.on_sent(call)
            except Exception as exc:  # noqa: BLE001 - kept for the test to raise
                log.exception("fake Telegram: on_sent failed")
                self.callback_errors.append(exc)
        return response

    def _bot_user(self) -> dict[str, Any]:
        return {"id": BOT_ID, "is_bot": True, "first_name": "Forge", "username": BOT_USERNAME,
                "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

    async def _api_getMe(self, params: dict[str, Any]) -> web.Response:
        return _ok(self._bot_user())

    async def _api_getUpdates(self, params: dict[str, Any]) -> web.Response:
        with self._lock:
            failure = self._get_updates_failures.pop(0) if self._get_updates_failures else None
        if failure is not None:
            return _error(failure, "Bad Gateway" if failure == 502 else "Internal Server Error")
        if self.webhook is not None:
            return _error(409, "Conflict: can't use getUpdates method while webhook is active; "
                               "use deleteWebhook to delete the webhook first")
        offset = int(params.get("offset") or 0)
        wait = min(float(params.get("timeout") or 0), LONG_POLL_MAX)
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                self._updates = [update for update in self._updates if update["update_id"] >= offset]
                ready = list(self._updates)
            if ready or time.monotonic() >= deadline:
                return _ok(ready)
            await asyncio.sleep(0.05)

    async def _api_sendMessage(self, params: dict[str, Any]) -> web.Response:
        message = {"message_id": next(self._message_ids), "date": int(time.time()),
                   "chat": {"id": int(params["chat_id"]), "type": "private"},
                   "from": self._bot_user(), "text": params.get("text", "")}
        return _ok(message)

    async def _api_editMessageText(self, params: dict[str, Any]) -> web.Response:
        with self._lock:
            limited = self._edit_rate_limits.pop(0) if self._edit_rate_limits else None
        if limited is not None:
            return _error(429, f"Too Many Requests: retry after {limited}", parameters={"retry_after": limited})
        message = {"message_id": int(params["message_id"]), "date": int(time.time()),
                   "edit_date": int(time.time()), "chat": {"id": int(params["chat_id"]), "type": "private"},
                   "from": self._bot_user(), "text": params.get("text", "")}
        return _ok(message)

    async def _api_getWebhookInfo(self, params: dict[str, Any]) -> web.Response:
        url = self.webhook.get("url", "") if self.webhook else ""
        return _ok({"url": url, "has_custom_certificate": False, "pending_update_count": 0})

    async def _api_setWebhook(self, params: dict[str, Any]) -> web.Response:
        self.webhook = dict(params) if params.get("url") else None
        return _ok(True)

    async def _api_deleteWebhook(self, params: dict[str, Any]) -> web.Response:
        self.webhook = None
        return _ok(True)

    async def _true(self, params: dict[str, Any]) -> web.Response:
        return _ok(True)

    _api_sendChatAction = _api_setMyCommands = _true
    _api_deleteMyCommands = _api_deleteMessage = _api_close = _api_logOut = _true


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(status: int, description: str, **extra: Any) -> web.Response:
    return web.json_response({"ok": False, "error_code": status, "description": description, **extra},
                             status=status)


async def _params(request: web.Request) -> dict[str, Any]:
    """The call's parameters: form fields (JSON-decoded unless a text field), a JSON body, or the query."""
    params: dict[str, Any] = dict(request.query)
    if request.content_type == "application/json":
        body = await request.json()
        return {**params, **(body if isinstance(body, dict) else {})}
    if request.method == "POST":
        form = await request.post()
        for key, value in form.items():
            if not isinstance(value, str):
                params[key] = "<file>"
            elif key in _STRING_FIELDS:
                params[key] = value
            else:
                try:
                    params[key] = json.loads(value)
                except ValueError:
                    params[key] = value
    return params


def _entities(text: str) -> list[dict[str, Any]]:
    """bot_command and mention entities, as Telegram would attach them (UTF-16 offsets)."""
    entities = []
    position = 0
    for word in text.split(" "):
        offset = len(text[:position].encode("utf-16-le")) // 2
        length = len(word.encode("utf-16-le")) // 2
        if word.startswith("/") and position == 0 and len(word) > 1:
            entities.append({"type": "bot_command", "offset": offset, "length": length})
        elif word.startswith("@") and len(word) > 1:
            entities.append({"type": "mention", "offset": offset, "length": length})
        position += len(word) + 1
    return entities


def reply_target(message_id: int, chat_id: int, group: bool = True) -> dict[str, Any]:
    """A message of the bot's, for `enqueue_message(reply_to=...)`."""
    chat = {"id": chat_id, "type": "supergroup", "title": "Test group"} if group else {"id": chat_id, "type": "private"}
    return {"message_id": message_id, "date": int(time.time()), "chat": chat,
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Forge", "username": BOT_USERNAME},
            "text": "an earlier answer"}
