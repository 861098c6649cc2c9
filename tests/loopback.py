"""A fake platform server for tests: an aiohttp app on 127.0.0.1, on its own loop in a background thread.

The test thread drives a `chatforge run` subprocess while the server answers
it; `_call` runs a coroutine on the server's loop (to push a websocket event,
say) and waits for it, bounded.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class LoopbackServer:
    name = "fake server"

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def make_app(self) -> web.Application:
        """The routes this fake serves."""
        raise NotImplementedError

    async def before_stop(self) -> None:
        """Close what the app holds open (websockets) before the loop stops."""

    def start(self) -> Any:
        started = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"the {self.name} did not start within 10 s")
        if errors:
            raise errors[0]
        return self

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        self._call(self.before_stop(), timeout=3, check=False)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _call(self, coroutine: Any, timeout: float = 5, check: bool = True) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except Exception:
            if check:
                raise
            return None
