"""A small HTTP receiver for Telegram's webhook updates that slow or odd clients cannot wear down.

Telegram (through the HTTPS reverse proxy in front) POSTs each update as a
JSON object to one path, with the secret in a header. The server is
`web_server.GuardedServer` (connections capped, header deadlines, bad
clients logged a line a minute); here, a body must arrive within
`body_timeout` (else 408) and be at most `max_body_size` bytes (else 413),
and is read only once the secret matched.

The secret is compared as raw bytes, so a header that is not UTF-8 is
just a wrong secret (403).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, Callable

from aiohttp import web

from chatforge.adapters.web_server import (HEADER_TIMEOUT, LOG_INTERVAL, BodyTooLarge, BodyTooSlow, GuardedServer,
                                           read_body)

log = logging.getLogger("chatforge.telegram.webhook")

MAX_CONNECTIONS = 100
"""Open connections at most. Telegram opens at most 100 (`max_connections` of setWebhook, 40 by default)."""
BODY_TIMEOUT = 10.0
"""Seconds for the body once the headers are in; an update is a few kB from a data centre."""
MAX_BODY_SIZE = 1024 ** 2
"""Bytes; an update is at most some tens of kB. Refusing a real one would stall Telegram's queue, so generous."""
SECRET_HEADER = b"x-telegram-bot-api-secret-token"


class WebhookReceiver:
    """Serves POST `path` on host:port: an update with the right secret goes to `queue`.

    `parse` turns the decoded JSON object into what the queue expects (it
    may raise, or return None, for something that is not an update: 400).
    """

    def __init__(self, path: str, secret: str, *, parse: Callable[[dict], Any], queue: asyncio.Queue,
                 host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                 max_body_size: int = MAX_BODY_SIZE, log_interval: float = LOG_INTERVAL) -> None:
        self.path, self.parse, self.queue = path, parse, queue
        self.host, self.max_connections = host, max_connections
        self.header_timeout, self.body_timeout, self.max_body_size = header_timeout, body_timeout, max_body_size
        self._secret = secret.encode()
        app = web.Application(client_max_size=max_body_size)
        app.router.add_post(path, self._receive)
        self._server = GuardedServer(app, host=host, port=port, logger=log, max_connections=max_connections,
                                     header_timeout=header_timeout, log_interval=log_interval)
        self._log = self._server.log

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.port

    @property
    def open_connections(self) -> int:
        return self._server.open_connections

    async def start(self) -> None:
        """Listen; OSError if the address cannot be bound."""
        await self._server.start()

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish (2 s at most), close every connection."""
        await self._server.stop()

    async def _receive(self, request: web.Request) -> web.Response:
        given = [value for name, value in request.raw_headers if name.lower() == SECRET_HEADER]
        if len(given) != 1 or not hmac.compare_digest(given[0], self._secret):
            return _closing(403)
        try:
            body = await read_body(request, self.max_body_size, self.body_timeout)
        except BodyTooSlow:
            self._log.warning("cut off a request whose body did not arrive within %g s", self.body_timeout)
            return _closing(408)
        except BodyTooLarge:
            return _closing(413)
        try:
            data = json.loads(body)
            update = self.parse(data) if isinstance(data, dict) else None
        except Exception:  # noqa: BLE001 - whatever was posted, it is not an update
            update = None
        if update is None:
            return web.Response(status=400)
        await self.queue.put(update)
        return web.Response()


def _closing(status: int) -> web.Response:
    response = web.Response(status=status)
    response.force_close()
    return response
