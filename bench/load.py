"""Engine throughput and memory under load, in-process, without a model.

Sends --rounds rounds of 1,000 messages (50 users, 5 in each of 10 chats,
20 messages each, all started at once) through `chatforge.testing.make_bot`
with a generator that answers after a seeded random 0..--pause-ms pause,
and prints, per memory backend: messages/s of each round, tracemalloc's
peak and how much traced memory grew from one round to the next (new
conversations every round). Nothing here loads a model or opens a socket.

    .venv/bin/python bench/load.py [--rounds 3] [--pause-ms 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from chatforge.memory import InMemoryMemory
from chatforge.sqlite_memory import SQLiteMemory
from chatforge.testing import make_bot

CHATS, USERS_PER_CHAT, MESSAGES_PER_USER = 10, 5, 20


class PausingGenerator:
    name = "pausing-fake"

    def __init__(self, pause: float, seed: int = 1234) -> None:
        self.random, self.pause = random.Random(seed), pause

    async def reply(self, history, text, on_text=None) -> str:
        await asyncio.sleep(self.random.uniform(0, self.pause))
        return f"re:{text} h={len(history)}"

    async def complete(self, instruction, max_new_tokens=None) -> str:
        return await self.reply([], instruction)

    def close(self) -> None:
        pass


async def one_round(bot, round_: int) -> float:
    """Seconds to answer 1,000 messages started together, interleaved across users."""
    async def ask(chat: int, user: int, n: int) -> None:
        reply = await bot.ask_async(f"r{round_}-chat{chat}-user{user}-n{n}", chat=f"r{round_}-chat{chat}",
                                    user=f"r{round_}-chat{chat}-user{user}")
        assert reply and reply.startswith("re:"), reply

    started = time.perf_counter()
    await asyncio.gather(*[ask(chat, user, n) for n in range(MESSAGES_PER_USER)
                           for chat in range(CHATS) for user in range(USERS_PER_CHAT)])
    return time.perf_counter() - started


def measure(backend: str, rounds: int, pause: float, folder: Path) -> dict:
    memory = InMemoryMemory() if backend == "memory" else SQLiteMemory(folder / f"{backend}.sqlite3")
    bot = make_bot({"limits": {"max_pending": 2000}}, generator=PausingGenerator(pause), memory=memory)
    total = CHATS * USERS_PER_CHAT * MESSAGES_PER_USER
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one_round(bot, -1))  # warm-up
        seconds = [loop.run_until_complete(one_round(bot, round_)) for round_ in range(rounds)]
        gc.collect()
        tracemalloc.start()
        after = []
        for round_ in range(rounds, 2 * rounds):
            loop.run_until_complete(one_round(bot, round_))
            gc.collect()
            after.append(tracemalloc.get_traced_memory()[0])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert bot.engine.queue.pending == 0 and not bot.engine.queue._locks
    finally:
        loop.run_until_complete(bot.engine.close())
        loop.close()
    growth = [later - earlier for earlier, later in zip(after, after[1:])]
    return {
        "backend": backend,
        "messages_per_round": total,
        "messages_per_s": [round(total / s) for s in seconds],
        "median_messages_per_s": round(total / statistics.median(seconds)),
        "tracemalloc_peak_mb": round(peak / 2**20, 1),
        "growth_per_round_kb": [round(g / 1024) for g in growth],
        "note": "growth with the in-memory backend includes the stored turns" if backend == "memory" else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause-ms", type=float, default=5.0, help="longest random pause of the fake generator")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(backend, args.rounds, args.pause_ms / 1000, Path(folder))
                   for backend in ("memory", "sqlite")]
    for result in results:
        print(f"{result['backend']:>6}: {result['median_messages_per_s']:,} messages/s "
              f"(rounds: {result['messages_per_s']}); tracemalloc peak {result['tracemalloc_peak_mb']} MB; "
              f"growth per round {result['growth_per_round_kb']} KB {result['note']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
