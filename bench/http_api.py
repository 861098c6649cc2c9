"""What the HTTP adapter adds to a request, against calling the engine directly, in one run.

The same engine answers three ways, interleaved round by round:
  direct   `await engine.handle(message)`, as an adapter inside the process does;
  whole    the official `openai` client, `chat.completions.create(...)`, over 127.0.0.1;
  stream   the same with `stream=True`, every chunk read.
The reply comes from the test kit's instant generator (it says `echo: TEXT`
with TEXT --words long, one chunk a word when streamed), so what is measured
is the adapter: HTTP, JSON, server-sent events, and the client's own parsing
(client and server share the process and its event loop, so this is the
latency a caller sees, both ends included). With --model, the embedded
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


async def timed(requests: int, ask: Callable[[int], Awaitable[str]]) -> float:
    """Milliseconds per request, over `requests` sent one after another."""
    started = time.perf_counter()
    for index in range(requests):
        text = await ask(index)
        assert text, "an empty reply"
    return (time.perf_counter() - started) * 1000 / requests


async def measure(engine: Any, rounds: int, requests: int, words: int, label: str) -> dict[str, Any]:
    import openai

    from chatforge.adapters.http import HttpAdapter, HttpConfig
    from chatforge.message import Message

    adapter = HttpAdapter(engine, HttpConfig(enabled=True, port=0))
    running = asyncio.create_task(adapter.run())
    await asyncio.wait_for(adapter.started.wait(), 10)
    question = " ".join(f"w{index}" for index in range(words))
    try:
        api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{adapter.port}/v1", api_key="unused", max_retries=0)

        async def direct(index: int) -> str:
            reply = await engine.handle(Message(question, platform="bench", chat=f"d{index % 8}", user="bench"))
            return reply.text

        async def whole(index: int) -> str:
            completion = await api.chat.completions.create(
                model=adapter.model_id, user=f"w{index % 8}", messages=[{"role": "user", "content": question}])
            return completion.choices[0].message.content

        async def stream(index: int) -> str:
            chunks = await api.chat.completions.create(
                model=adapter.model_id, user=f"s{index % 8}", stream=True,
                messages=[{"role": "user", "content": question}])
            return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks if chunk.choices])

        ways = {"direct": direct, "whole": whole, "stream": stream}
        for ask in ways.values():  # warm up: connections, first-use imports
            await ask(0)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_index in range(rounds):
            order = list(ways) if round_index % 2 == 0 else list(reversed(ways))
            for name in order:
                times[name].append(await timed(requests, ways[name]))
        await api.close()
    finally:
        await adapter.stop()
        await asyncio.wait_for(running, 30)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"generator": label, "words": words, "rounds": rounds, "requests_per_round": requests,
              "ms_per_request": medians,
              "overhead_ms": {"whole": medians["whole"] - medians["direct"],
                              "stream": medians["stream"] - medians["direct"]},
              "ratio_to_direct": {"whole": medians["whole"] / medians["direct"],
                                  "stream": medians["stream"] / medians["direct"]}}
    print(f"\n{label}: {words}-word question and reply, {requests} requests a round, median of {rounds} rounds")
    print(f"{'':8} {'ms/request':>11} {'added ms':>9} {'ratio':>6}")
    for name in ways:
        added = medians[name] - medians["direct"]
        print(f"{name:8} {medians[name]:11.2f} {added:9.2f} {medians[name] / medians['direct']:6.2f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=50, help="requests per way per round (instant generator)")
    parser.add_argument("--words", type=int, default=64, help="words in the question, and in the echoed reply")
    parser.add_argument("--model", action="store_true", help="also time the embedded SmolLM2 (5 requests a round)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/chatforge_bench_http_api.json"))
    args = parser.parse_args()

    from chatforge.testing import make_bot

    results = []
    no_limits = {"limits": {"rate_per_minute": 1e9, "rate_burst": 10 ** 9}, "plugins": {"sentiment": {"enabled": False}}}
    bot = make_bot(no_limits)  # the instant generator; in-process memory
    results.append(asyncio.run(measure(bot.engine, args.rounds, args.requests, args.words, "instant generator")))
    bot.close()
    if args.model:
        from chatforge.app import create_generator
        from chatforge.config import load_settings_from_dict
        from chatforge.local.model_loading import embedded_gguf_file

        settings = load_settings_from_dict({"generator": {"model": str(embedded_gguf_file()), "temperature": 0,
                                                          "max_new_tokens": 32}})
        model_bot = make_bot(no_limits, generator=create_generator(settings))
        results.append(asyncio.run(measure(model_bot.engine, max(3, args.rounds // 2), 5, 16, "embedded SmolLM2")))
        model_bot.close()
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
