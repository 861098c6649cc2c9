"""What the HTTP adapter adds to a request, against calling the engine directly, in one run.

The same engine answers six ways, interleaved round by round:
  direct           `await engine.handle(message)`, as an adapter inside the process does;
  raw_whole        one HTTP/1.0 POST over a socket, the JSON body read: the server's own cost;
  whole            the official `openai` client, `chat.completions.create(...)`, over 127.0.0.1;
  direct_streamed  `await engine.handle(message, on_text)`, the pieces collected as they come;
  raw_stream       the raw POST with `stream: true`, the events read;
  stream           the client with `stream=True`, every chunk read.
The whole ones are compared with "direct", the streamed ones with "direct_streamed". Every
request is a new conversation, so each way is given the same prompt.
The reply comes from the test kit's instant generator (it says `echo: TEXT`
with TEXT --words long, one chunk a word when streamed), so what is measured
is the adapter: HTTP, JSON, server-sent events, and the client's own parsing
(the latency a caller sees). The client runs in a process of its own, as a real
one would; --same-process puts it in the server's event loop instead. With --model, the embedded
SmolLM2 answers too, to put the overhead beside a real reply's time.

    .venv/bin/python bench/http_api.py [--rounds 7] [--requests 50] [--words 64] [--model]

Under a minute without --model; nothing leaves 127.0.0.1. Prints medians per
request in milliseconds and writes them as JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def timed(requests: int, ask: Callable[[str], Awaitable[str]], round_index: int) -> tuple[float, set[str]]:
    """Milliseconds per request over `requests` sent one after another, each in a new conversation (so every
    way gets the same prompt, and with greedy decoding the same reply), and the replies."""
    replies = set()
    started = time.perf_counter()
    for index in range(requests):
        text = await ask(f"r{round_index}-{index}")
        assert text, "an empty reply"
        replies.add(text)
    return (time.perf_counter() - started) * 1000 / requests, replies


def client_ways(base_url: str, model: str, question: str) -> dict[str, Callable[[str], Awaitable[str]]]:
    """The two ways through the API, with the official client."""
    import openai

    api = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def whole(conversation: str) -> str:
        completion = await api.chat.completions.create(
            model=model, user="w" + conversation, messages=[{"role": "user", "content": question}])
        return completion.choices[0].message.content

    async def stream(conversation: str) -> str:
        chunks = await api.chat.completions.create(
            model=model, user="s" + conversation, stream=True, messages=[{"role": "user", "content": question}])
        return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks if chunk.choices])

    host, port = base_url.split("//")[1].split("/")[0].split(":")

    async def raw(conversation: str, stream: bool) -> str:
        """The least a client can do: HTTP/1.0 over a socket (no chunked encoding: the body ends at close)."""
        body = json.dumps({"model": model, "user": ("rs" if stream else "rw") + conversation, "stream": stream,
                           "messages": [{"role": "user", "content": question}]}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body)) + body)
        answer = await reader.read()
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
        if not stream:
            return json.loads(payload)["choices"][0]["message"]["content"]
        events = [json.loads(line[6:]) for line in payload.decode().split("\n")
                  if line.startswith("data: {")]
        return "".join(event["choices"][0]["delta"].get("content", "") for event in events if event["choices"])

    return {"whole": whole, "stream": stream,
            "raw_whole": lambda conversation: raw(conversation, False),
            "raw_stream": lambda conversation: raw(conversation, True)}


async def serve_as_client(base_url: str, model: str, question: str) -> None:
    """The client process: for each line "WAY REQUESTS ROUND" on stdin, one JSON line of (ms, replies)."""
    ways = client_ways(base_url, model, question)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        way, requests, round_index = line.split()
        ms, replies = await timed(int(requests), ways[way], int(round_index))
        print(json.dumps([ms, sorted(replies)]), flush=True)


async def measure(engine: Any, rounds: int, requests: int, words: int, label: str,
                  client_process: bool) -> dict[str, Any]:
    from chatforge.adapters.http import HttpAdapter, HttpConfig
    from chatforge.message import Message

    adapter = HttpAdapter(engine, HttpConfig(enabled=True, port=0))
    running = asyncio.create_task(adapter.run())
    await asyncio.wait_for(adapter.started.wait(), 10)
    question = " ".join(f"w{index}" for index in range(words))
    base_url = f"http://127.0.0.1:{adapter.port}/v1"
    child = None
    try:
        async def direct(conversation: str) -> str:
            reply = await engine.handle(Message(question, platform="bench", chat="d" + conversation, user="bench"))
            return reply.text

        async def direct_streamed(conversation: str) -> str:
            pieces: list[str] = []
            reply = await engine.handle(Message(question, platform="bench", chat="t" + conversation, user="bench"),
                                        pieces.append)
            return reply.text

        batches: dict[str, Callable[[int, int], Awaitable[tuple[float, set[str]]]]] = {
            "direct": lambda n, r: timed(n, direct, r), "direct_streamed": lambda n, r: timed(n, direct_streamed, r)}
        if client_process:  # the client on its own core, as Open WebUI or a script would be
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client-of", base_url, adapter.model_id, question,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

            def remote(way: str) -> Callable[[int, int], Awaitable[tuple[float, set[str]]]]:
                async def batch(n: int, round_index: int) -> tuple[float, set[str]]:
                    child.stdin.write(f"{way} {n} {round_index}\n".encode())
                    await child.stdin.drain()
                    ms, replies = json.loads(await asyncio.wait_for(child.stdout.readline(), 600))
                    return ms, set(replies)
                return batch
            batches.update({way: remote(way) for way in ("whole", "stream", "raw_whole", "raw_stream")})
        else:
            local = client_ways(base_url, adapter.model_id, question)
            batches.update({way: (lambda n, r, way=way: timed(n, local[way], r))
                            for way in ("whole", "stream", "raw_whole", "raw_stream")})
        ways = ["direct", "raw_whole", "whole", "direct_streamed", "raw_stream", "stream"]
        replies: dict[str, set[str]] = {name: set() for name in ways}
        for name in ways:  # warm up: connections, first-use imports
            await batches[name](1, -1)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_index in range(rounds):
            for name in (ways if round_index % 2 == 0 else reversed(ways)):
                ms, said = await batches[name](requests, round_index)
                times[name].append(ms)
                replies[name] |= said
    finally:
        if child is not None:
            child.stdin.close()
            await asyncio.wait_for(child.wait(), 30)
        await adapter.stop()
        await asyncio.wait_for(running, 30)
    # The same work is measured: one reply whole, one streamed (a streamed reply cut by max_new_tokens ends
    # with "…" where a whole one ends at its last sentence: the text sent cannot be taken back).
    baseline = {"direct": "direct", "raw_whole": "direct", "whole": "direct",
                "direct_streamed": "direct_streamed", "raw_stream": "direct_streamed", "stream": "direct_streamed"}
    for way, base in baseline.items():
        assert replies[way] == replies[base] and len(replies[base]) == 1, (way, replies)
    medians = {name: statistics.median(values) for name, values in times.items()}
    over_http = [way for way in ways if baseline[way] != way]
    result = {"generator": label, "client": "own process" if client_process else "same process",
              "words": words, "rounds": rounds, "requests_per_round": requests,
              "ms_per_request": medians,
              "overhead_ms": {name: medians[name] - medians[baseline[name]] for name in over_http},
              "ratio_to_direct": {name: medians[name] / medians[baseline[name]] for name in over_http}}
    where = "in its own process" if client_process else "in the server's process"
    print(f"\n{label}: {words}-word question and reply, {requests} requests a round, median of {rounds} rounds; "
          f"the client {where}")
    print(f"{'':16} {'ms/request':>11} {'added ms':>9} {'ratio':>6}   against")
    for name in ways:
        base = medians[baseline[name]]
        print(f"{name:16} {medians[name]:11.2f} {medians[name] - base:9.2f} {medians[name] / base:6.2f}   "
              f"{baseline[name]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=50, help="requests per way per round (instant generator)")
    parser.add_argument("--words", type=int, default=64, help="words in the question, and in the echoed reply")
    parser.add_argument("--model", action="store_true", help="also time the embedded SmolLM2 (3 requests a round)")
    parser.add_argument("--same-process", action="store_true",
                        help="run the client in the server's process and event loop (it then competes for the GIL)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/chatforge_bench_http_api.json"))
    parser.add_argument("--client-of", nargs=3, metavar=("URL", "MODEL", "QUESTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_of:
        asyncio.run(serve_as_client(*args.client_of))
        return

    from chatforge.testing import make_bot

    results = []
    no_limits = {"limits": {"rate_per_minute": 1e9, "rate_burst": 10 ** 9}, "plugins": {"sentiment": {"enabled": False}}}
    bot = make_bot(no_limits)  # the instant generator; in-process memory
    results.append(asyncio.run(measure(bot.engine, args.rounds, args.requests, args.words, "instant generator",
                                       not args.same_process)))
    bot.close()
    if args.model:
        from chatforge.app import create_generator
        from chatforge.config import load_settings_from_dict
        from chatforge.local.model_loading import embedded_gguf_file

        settings = load_settings_from_dict({"generator": {"model": str(embedded_gguf_file()), "temperature": 0,
                                                          "max_new_tokens": 32}})
        model_bot = make_bot(no_limits, generator=create_generator(settings))
        results.append(asyncio.run(measure(model_bot.engine, args.rounds, 3, 16, "embedded SmolLM2",
                                           not args.same_process)))
        model_bot.close()
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
