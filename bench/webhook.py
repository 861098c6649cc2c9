"""Slow clients against the Telegram webhook server: chatforge's receiver beside plain aiohttp.

Opens --stalled connections that send half their request headers and stop
(the slowloris pattern), to a server limited to --nofile file descriptors,
then tries a valid update every 0.25 s for --seconds seconds. For each
server it prints the file descriptors it held at the peak, when the valid
update was answered, and how much it logged. The baseline is the same
handler on aiohttp's own AppRunner and TCPSite, which is what chatforge
served before it had its own receiver. Each server runs in a subprocess
(this file with --serve) that is killed at the end.

    .venv/bin/python bench/webhook.py [--stalled 2000] [--nofile 1024] [--seconds 20]

About a minute; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECRET = "hook-secret_42"
HALF = b"POST /hook HTTP/1.1\r\nHost: x\r\nX-Telegram-Bo"
BODY = json.dumps({"update_id": 1}).encode()
VALID = (b"POST /hook HTTP/1.1\r\nHost: x\r\nX-Telegram-Bot-Api-Secret-Token: %s\r\n"
         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (SECRET.encode(), len(BODY))) + BODY


async def serve(kind: str) -> None:
    """Run one server on a free port, print the port, serve until killed."""
    from aiohttp import web

    queue: asyncio.Queue = asyncio.Queue()
    if kind == "chatforge":
        from chatforge.adapters.telegram_webhook import WebhookReceiver

        receiver = WebhookReceiver("/hook", SECRET, parse=lambda data: data, queue=queue, host="127.0.0.1", port=0)
        await receiver.start()
        port = receiver.port
    else:
        async def receive(request: web.Request) -> web.Response:
            given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
            if not hmac.compare_digest(given.encode(), SECRET.encode()):
                return web.Response(status=403)
            await queue.put(await request.json())
            return web.Response()

        app = web.Application()
        app.router.add_post("/hook", receive)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
    print(port, flush=True)
    await asyncio.sleep(3600)


def measure(kind: str, stalled: int, nofile: int, seconds: float, scratch: Path) -> dict:
    log_path = scratch / f"{kind}.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--nofile", str(nofile)],
                                  stdout=subprocess.PIPE, stderr=log_file)
        sockets: list[socket.socket] = []
        try:
            port = int(server.stdout.readline())

            def descriptors() -> int:
                return len(os.listdir(f"/proc/{server.pid}/fd"))

            baseline = descriptors()
            start = time.monotonic()
            for _ in range(stalled):
                if time.monotonic() - start > 15:
                    break
                client = socket.socket()
                client.settimeout(0.5)
                try:
                    client.connect(("127.0.0.1", port))
                    client.sendall(HALF)
                    sockets.append(client)
                except OSError:
                    client.close()
            opened = time.monotonic()
            answered, peak = None, 0
            while time.monotonic() - opened < seconds:
                peak = max(peak, descriptors())
                if answered is None:
                    client = socket.socket()
                    client.settimeout(1)
                    try:
                        client.connect(("127.0.0.1", port))
                        client.sendall(VALID)
                        if client.recv(100).startswith(b"HTTP/1.1 200"):
                            answered = time.monotonic() - start
                    except OSError:
                        pass
                    finally:
                        client.close()
                time.sleep(0.25)
        finally:
            server.kill()
            server.wait()
            for client in sockets:
                client.close()
    logged = log_path.read_bytes()
    return {"server": kind, "descriptors_before": baseline, "descriptors_peak": peak,
            "answered_after_s": None if answered is None else round(answered, 2),
            "log_bytes": len(logged), "log_lines": logged.count(b"\n")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stalled", type=int, default=2000)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--serve", choices=["chatforge", "aiohttp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        asyncio.run(serve(args.serve))
        return
    with tempfile.TemporaryDirectory() as scratch:
        for kind in ("aiohttp", "chatforge"):
            row = measure(kind, args.stalled, args.nofile, args.seconds, Path(scratch))
            answered = f"{row['answered_after_s']} s" if row["answered_after_s"] is not None else "never"
            print(f"{kind}: {args.stalled} stalled connections; file descriptors {row['descriptors_before']} -> "
                  f"peak {row['descriptors_peak']} (limit {args.nofile}); a valid update answered after {answered}; "
                  f"logged {row['log_lines']:,} lines, {row['log_bytes']:,} bytes in {args.seconds:g} s")


if __name__ == "__main__":
    main()
