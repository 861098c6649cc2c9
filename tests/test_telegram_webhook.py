"""The Telegram webhook receiver against slow and odd clients: real sockets on 127.0.0.1, short limits.

Each test starts a WebhookReceiver on a free loopback port with limits
far below the defaults (so it runs in a few seconds), talks raw HTTP to it
and stops it. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from chatforge.adapters.telegram_webhook import WebhookReceiver

PATH = "/telegram-hook"
SECRET = "hook-secret_42"
UPDATE = {"update_id": 7, "message": {"message_id": 1, "date": 0, "text": "hi",
                                      "chat": {"id": 5, "type": "private"}}}
HALF_HEADERS = b"POST /telegram-hook HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Telegram-Bo"


def run(test: Any, timeout: float = 30) -> Any:
    """Run one async test body on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(test, timeout))


async def start(**limits: Any) -> WebhookReceiver:
    receiver = WebhookReceiver(PATH, SECRET, parse=lambda data: data, queue=asyncio.Queue(),
                               host="127.0.0.1", port=0, **limits)
    await receiver.start()
    return receiver


def request(body: bytes, secret: bytes = SECRET.encode(), length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return (b"POST /telegram-hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Telegram-Bot-Api-Secret-Token: " + secret + b"\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\nConnection: close\r\n\r\n" + body)


async def post(port: int, data: bytes, timeout: float = 5) -> int:
    """Send `data` on a new connection; the response's status, or 0 if closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except ConnectionError:
        return 0
    finally:
        writer.close()


async def closed_after(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Seconds until the server closed the connection (it may answer first), or None if still open."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), max(0.0, started + timeout - time.monotonic())):
            pass
    except asyncio.TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


async def settled(condition: Any, timeout: float) -> bool:
    """Wait until `condition()` holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_client_that_stalls_in_its_headers_is_disconnected_within_the_header_timeout():
    async def body():
        receiver = await start(header_timeout=0.5)
        try:
            stalled = await asyncio.open_connection("127.0.0.1", receiver.port)
            stalled[1].write(HALF_HEADERS)
            trickling = await asyncio.open_connection("127.0.0.1", receiver.port)

            async def trickle() -> None:  # one byte every 0.1 s: the deadline is for all the headers
                for byte in HALF_HEADERS:
                    if trickling[1].is_closing():
                        return
                    trickling[1].write(bytes([byte]))
                    await asyncio.sleep(0.1)

            feeding = asyncio.create_task(trickle())
            times = await asyncio.gather(closed_after(stalled[0], 3), closed_after(trickling[0], 3))
            feeding.cancel()
            for _, writer in (stalled, trickling):
                writer.close()
            assert all(seconds is not None and seconds < 1.5 for seconds in times), times
            assert await post(receiver.port, request(json.dumps(UPDATE).encode())) == 200
            assert await settled(lambda: receiver.open_connections == 0, 2)
        finally:
            await receiver.stop()

    run(body())


def test_connections_beyond_the_cap_are_refused_and_a_valid_update_still_gets_through():
    async def body():
        receiver = await start(max_connections=20, header_timeout=3.0)
        clients = []
        try:
            for _ in range(60):
                client = await asyncio.open_connection("127.0.0.1", receiver.port)
                client[1].write(HALF_HEADERS)
                clients.append(client)
            opened = time.monotonic()
            times = await asyncio.gather(*(closed_after(reader, 0.8) for reader, _ in clients))
            refused = [seconds for seconds in times if seconds is not None]
            assert len(refused) == 40, times
            assert receiver.open_connections == 20

            # The valid update is refused while the cap is full, and accepted once the slow ones time out.
            status, peak = 0, 0
            while status != 200 and time.monotonic() - opened < 6:
                peak = max(peak, receiver.open_connections)
                status = await post(receiver.port, request(json.dumps(UPDATE).encode()), timeout=2)
                if status != 200:
                    await asyncio.sleep(0.1)
            assert status == 200 and peak <= 20
            assert time.monotonic() - opened < 3.0 + 1.5
            assert receiver.queue.get_nowait() == UPDATE
        finally:
            for _, writer in clients:
                writer.close()
            await receiver.stop()

    run(body())


def test_a_body_that_trickles_slower_than_the_body_timeout_is_cut_off():
    async def body():
        receiver = await start(body_timeout=0.5)
        try:
            data = json.dumps(UPDATE).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
            writer.write(request(b"", length=len(data)))
            started = time.monotonic()

            async def trickle() -> None:  # the whole update would take 10 s or more
                for byte in data:
                    if writer.is_closing():
                        return
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)

            feeding = asyncio.create_task(trickle())
            try:
                line = await asyncio.wait_for(reader.readline(), 3)
            except asyncio.TimeoutError:
                line = b"no answer within 3 s"
            finally:
                feeding.cancel()
                writer.close()
            assert line.startswith(b"HTTP/1.1 408"), line
            assert time.monotonic() - started < 1.5
            assert receiver.queue.empty()
        finally:
            await receiver.stop()

    run(body())


def test_a_body_over_the_size_limit_gets_413_before_it_is_read():
    async def body():
        receiver = await start(max_body_size=1000)
        try:
            assert await post(receiver.port, request(b"", length=5000)) == 413  # no body sent at all
            assert await post(receiver.port, request(json.dumps(UPDATE).encode())) == 200
        finally:
            await receiver.stop()

    run(body())


def test_a_secret_header_that_is_not_utf8_gets_403_and_no_traceback(caplog):
    async def body():
        receiver = await start()
        try:
            data = json.dumps(UPDATE).encode()
            for secret in (b"\xff\xfe", SECRET.encode() + b"\xff", b"\xc3(" + SECRET.encode(), b"wrong"):
                assert await post(receiver.port, request(data, secret=secret)) == 403, secret
            assert receiver.queue.empty()
            assert await post(receiver.port, request(data)) == 200
            assert await post(receiver.port, request(b"[1, 2]")) == 400  # JSON, but not an update
            assert await post(receiver.port, request(b"{not json")) == 400
        finally:
            await receiver.stop()

    with caplog.at_level(logging.DEBUG):
        run(body())
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


def test_errors_from_many_bad_clients_are_logged_once_a_minute_with_a_count(caplog):
    async def body():
        receiver = await start()
        try:
            for index in range(200):
                status = await post(receiver.port, b"POST /telegram-hook HTTP/1.1\r\nBad Header %d\r\n\r\n" % index)
                assert status == 400
        finally:
            await receiver.stop()

    with caplog.at_level(logging.INFO):
        run(body())
    lines = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 3, [record.getMessage()[:200] for record in lines]
    assert not any(record.exc_info for record in lines)
    assert "199 more" in caplog.text  # said when the receiver stopped


# A receiver in a process left with a few free file descriptors: asyncio fails accept() in a loop.
STARVED_SERVER = """
import asyncio, logging, os, resource, sys
from chatforge.adapters.telegram_webhook import WebhookReceiver

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

async def main():
    receiver = WebhookReceiver("/hook", "s", parse=dict, queue=asyncio.Queue(), host="127.0.0.1", port=0)
    await receiver.start()
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 5, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(receiver.port, flush=True)
    await asyncio.sleep(30)

asyncio.run(main())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
def test_accept_errors_when_file_descriptors_run_out_are_logged_once_a_minute():
    server = subprocess.Popen([sys.executable, "-c", STARVED_SERVER], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    clients = []
    try:
        port = int(server.stdout.readline() or 0)
        assert port, server.communicate(timeout=10)[1].decode()[-2000:]
        for _ in range(30):  # the kernel completes these connections; the server cannot accept most
            client = socket.create_connection(("127.0.0.1", port), timeout=2)
            client.sendall(HALF_HEADERS)
            clients.append(client)
        time.sleep(1.5)
    finally:
        for client in clients:
            client.close()
        server.kill()
        _, errors = server.communicate(timeout=10)
    text = errors.decode(errors="replace")
    assert 1 <= text.count("out of system resource") <= 2, text[:3000]
    assert "Traceback" not in text


def test_a_port_in_use_is_an_oserror_and_stop_leaves_nothing_behind():
    async def body():
        asyncio_filters = list(logging.getLogger("asyncio").filters)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            receiver = WebhookReceiver(PATH, SECRET, parse=dict, queue=asyncio.Queue(), host="127.0.0.1",
                                       port=taken.getsockname()[1])
            with pytest.raises(OSError):
                await receiver.start()
        assert logging.getLogger("asyncio").filters == asyncio_filters
        receiver = await start()
        stalled = await asyncio.open_connection("127.0.0.1", receiver.port)
        stalled[1].write(HALF_HEADERS)
        assert await settled(lambda: receiver.open_connections == 1, 2)
        await receiver.stop()
        assert await closed_after(stalled[0], 2) is not None  # stop closed it
        stalled[1].close()
        assert receiver.open_connections == 0
        assert logging.getLogger("asyncio").filters == asyncio_filters

    run(body())
