"""An aiohttp server that slow or odd clients cannot wear down: shared by the Telegram webhook and the HTTP API.

aiohttp parses the HTTP; around it this module bounds what any one client
can hold, because aiohttp's server alone waits for request headers for as
long as a client likes (up to its keep-alive timeout, an hour by default)
and accepts connections without limit:

- a connection must complete its request headers within `header_timeout`
  of opening (or of its previous request), or it is closed; while a request
  is being answered (a reply streaming for a minute) the clock is stopped,
  and a client that keeps an idle connection after a request (HTTP
  keep-alive) has it closed without a log line;
- at most `max_connections` are open at once: a connection beyond them
  gets a 503 and is closed at once, so file descriptors stay bounded;
- the errors bad clients cause (aiohttp's, and asyncio's failed accept()
  when file descriptors run out) are logged one line per kind per
  `log_interval`, with how many were not logged; no traceback for a
  client's fault.

What a request may send (its body's size and time) is the application's
business: `read_body` gives the usual answer.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

MAX_CONNECTIONS = 100
HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send complete request headers; clients and proxies send them at once."""
LOG_INTERVAL = 60.0
"""Seconds between two log lines of the same kind about bad clients."""
_LINGER = 1.0
"""Seconds aiohttp goes on reading an unread body after answering, so the client sees the answer."""
_REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BodyTooLarge(Exception):
    """The request's body is over the limit (answer 413)."""


class BodyTooSlow(Exception):
    """The request's body did not arrive in time (answer 408)."""


async def read_body(request: web.Request, max_size: int, timeout: float) -> bytes:
    """The whole body, or BodyTooLarge / BodyTooSlow: a client may neither send gigabytes nor trickle bytes."""
    if request.content_length is not None and request.content_length > max_size:
        raise BodyTooLarge()
    try:
        body = await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise BodyTooSlow() from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge() from None
    if len(body) > max_size:
        raise BodyTooLarge()
    return body


class GuardedServer:
    """Serves `app` on host:port with the bounds above. `app` should be built with `client_max_size`."""

    def __init__(self, app: web.Application, *, host: str, port: int, logger: logging.Logger,
                 max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT,
                 log_interval: float = LOG_INTERVAL, shutdown_timeout: float = 2.0) -> None:
        self.app, self.host, self.max_connections = app, host, max_connections
        self.header_timeout, self.shutdown_timeout = header_timeout, shutdown_timeout
        self._requested_port = port
        self.log = _Throttled(logger, log_interval)
        self._connections: dict[Any, _Connection] = {}  # aiohttp's protocol -> our wrapper
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._accept_errors = _AcceptErrors(self.log)
        app.middlewares.insert(0, self._headers_done)  # outermost: every request stops the header clock

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Listen; OSError if the address cannot be bound."""
        # aiohttp logs bad clients through `logger`: ours keeps that to a line a minute.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self.shutdown_timeout, logger=self.log,
                               lingering_time=_LINGER)
        await runner.setup()
        self._runner = runner  # before listening: the first connection may come at once
        try:
            self._server = await asyncio.get_running_loop().create_server(self._accept, self.host,
                                                                          self._requested_port)
        except BaseException:
            self._runner = None
            await runner.cleanup()
            raise
        logging.getLogger("asyncio").addFilter(self._accept_errors)

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish (`shutdown_timeout` at most), close every connection."""
        server, runner, self._server, self._runner = self._server, self._runner, None, None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()
        for connection in list(self._connections.values()):
            connection.abort()
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                self.log.logger.warning("connections were still closing after 2 s")
        logging.getLogger("asyncio").removeFilter(self._accept_errors)
        self.log.flush()

    def _accept(self) -> asyncio.Protocol:
        """The server's protocol factory: counts connections from the moment they are accepted."""
        if self._runner is None or self._runner.server is None or len(self._connections) >= self.max_connections:
            return _Refused(self.log, self.max_connections)
        handler = self._runner.server()
        connection = self._connections[handler] = _Connection(self, handler)
        return connection

    @web.middleware
    async def _headers_done(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Every request passes here once its headers are parsed: the header deadline stops, and
        starts again for the next request on the connection."""
        connection = self._connections.get(request.protocol)
        if connection is not None:
            connection.stop_deadline()
        try:
            return await handler(request)
        finally:
            if connection is not None:
                connection.start_deadline(after_request=True)


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped to give each request's headers a deadline
    and to keep the count of open connections."""

    def __init__(self, server: GuardedServer, handler: Any) -> None:
        self.server, self.handler = server, handler
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._idle = False  # a request was answered and nothing has come since: a client's keep-alive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.handler.connection_made(transport)
        self.start_deadline()

    def data_received(self, data: bytes) -> None:
        self._idle = False
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_deadline()
        self.server._connections.pop(self.handler, None)
        self.handler.connection_lost(exc)

    def start_deadline(self, after_request: bool = False) -> None:
        self.stop_deadline()
        self._idle = after_request
        self._deadline = asyncio.get_running_loop().call_later(self.server.header_timeout, self._too_slow)

    def stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._idle:  # an HTTP client keeping its connection for later: closed, and nothing to report
            self.abort()
            return
        self.server.log.warning("closed a connection that sent no complete request headers within %g s",
                                   self.server.header_timeout)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: answered 503 and closed before anything is read."""

    def __init__(self, logger: _Throttled, cap: int) -> None:
        self._logger, self._cap = logger, cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._logger.warning("refused a connection: %d are open already", self._cap)
        transport.write(_REFUSAL)  # type: ignore[attr-defined]
        transport.close()


class _Throttled(logging.LoggerAdapter):
    """A logger that lets one line per kind (message template) through per `interval` and says how
    many of that kind it held back: what a flood of bad clients produces. A client's fault (bad
    HTTP, a socket error) is one line; anything else keeps its traceback, being our own bug."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        super().__init__(logger, {})
        self.interval = interval
        self._kinds: dict[str, tuple[float, int, str]] = {}  # template -> (last logged, held back, last line)

    def log(self, level: int, msg: Any, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        kind, now = str(msg), time.monotonic()
        last, held, line = self._kinds.get(kind, (-self.interval, 0, ""))
        if now - last < self.interval:
            self._kinds[kind] = (last, held + 1, line)
            return
        line = str(msg) % args if args else str(msg)
        error = _error(exc_info)
        if isinstance(error, (HttpProcessingError, OSError)):
            line += ": " + " ".join(f"{type(error).__name__}: {error}".split())[:300]
            exc_info = None
        if len(self._kinds) >= 100:  # a bounded memory of kinds
            self._kinds.clear()
        self._kinds[kind] = (now, 0, line)
        if held:
            line += f" (and {held} more like it since the last such line)"
        self.logger.log(level, "%s", line, exc_info=exc_info, **kwargs)

    def flush(self) -> None:
        """Say how many lines were held back since the last of each kind (at stop)."""
        for kind, (last, held, line) in list(self._kinds.items()):
            if held:
                self.logger.warning("%s (and %d more like it since, not logged)", line, held)
            self._kinds[kind] = (last, 0, line)


class _AcceptErrors(logging.Filter):
    """Sends asyncio's "socket.accept() out of system resource" through our throttle. asyncio logs
    each failed accept() with a traceback, and once file descriptors run out it retries many times
    a second (CPython gh-151615): gigabytes of log. Other asyncio records pass untouched."""

    def __init__(self, throttled: _Throttled) -> None:
        super().__init__()
        self._throttled = throttled

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        self._throttled.log(record.levelno, "socket.accept() out of system resource (no file descriptor left)",
                            exc_info=record.exc_info)
        return False


def _error(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1]
    return sys.exc_info()[1] if exc_info else None
