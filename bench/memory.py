"""What a memory store costs: messages/s through the engine, and the time one memory call takes.

Runs, in one process and interleaved over --rounds rounds, the same load on
each store: `memory` (in the process: the baseline), `sqlite` (a file) and
`postgres` (a real server: --postgres-url, or else a throwaway cluster started
here from Debian's binaries, as the tests do; skipped with the reason when
there is none). Per store:
- messages/s: 1,000 messages (50 users in 10 chats, 20 each, all sent at once)
  through `chatforge.testing.make_bot` with an instant fake generator, so the
  engine and its memory are all that is measured; each message reads its
  history and stores a question and its answer;
- the median and 95th percentile of one `recent()` and one `add()` of a
  question and answer, called as the engine calls them (off the event loop);
- the ratio of each store's messages/s to the in-process baseline.

    .venv/bin/python bench/memory.py [--rounds 5] [--postgres-url URL] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/postgres.py

from chatforge.conversation import ConversationKey  # noqa: E402
from chatforge.memory import InMemoryMemory, Turn  # noqa: E402
from chatforge.sqlite_memory import SQLiteMemory  # noqa: E402
from chatforge.testing import make_bot  # noqa: E402

CHATS, USERS_PER_CHAT, MESSAGES_PER_USER = 10, 5, 20


class InstantGenerator:
    name = "instant-fake"

    async def reply(self, history, text, on_text=None) -> str:
        return f"re:{text} h={len(history)}"

    async def complete(self, instruction, max_new_tokens=None) -> str:
        return instruction

    def close(self) -> None:
        pass


async def messages_per_second(bot, tag: str) -> float:
    async def ask(chat: int, user: int, n: int) -> None:
        reply = await bot.ask_async(f"{tag}-{n}", chat=f"{tag}-chat{chat}", user=f"{tag}-user{chat}-{user}")
        assert reply and reply.startswith("re:"), reply

    started = time.perf_counter()
    await asyncio.gather(*[ask(chat, user, n) for n in range(MESSAGES_PER_USER)
                           for chat in range(CHATS) for user in range(USERS_PER_CHAT)])
    return CHATS * USERS_PER_CHAT * MESSAGES_PER_USER / (time.perf_counter() - started)


async def call_latencies(bot, tag: str, calls: int = 200) -> tuple[list[float], list[float]]:
    """Seconds of one recent() and one add() of a pair, each awaited as the engine awaits it."""
    engine, store = bot.engine, bot.memory
    key = ConversationKey("bench", f"{tag}-latency", None, "u")
    reads, writes = [], []
    for index in range(calls):
        started = time.perf_counter()
        await engine._off_loop(store.add, key, Turn("user", f"q{index}", user="u"),
                               Turn("assistant", f"a{index}", reply_to="u"))
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        await engine._off_loop(store.recent, key, 20)
        reads.append(time.perf_counter() - started)
    return reads, writes


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def open_postgres(url: str | None, folder: Path):
    """(store factory, server to stop or None, why not) for the postgres row."""
    try:
        from chatforge.postgres_memory import PostgresBackend
    except ImportError as exc:
        return None, None, f"chatforge.postgres_memory is not importable ({exc})"
    server = None
    if url is None:
        try:
            from tests.postgres import PostgresServer
            server = PostgresServer(folder / "postgres")
            server.start()
            url = server.create_database("bench")
        except Exception as exc:  # noqa: BLE001 - no PostgreSQL here: the row is skipped, with the reason
            if server is not None:
                server.stop()
            return None, None, f"no PostgreSQL server ({type(exc).__name__}: {exc}); pass --postgres-url"
    config = PostgresBackend.Config(url=url)
    return (lambda: PostgresBackend.create(config, None)), server, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres-url")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        postgres, server, why_not = open_postgres(args.postgres_url, folder)
        stores = {"memory": InMemoryMemory, "sqlite": lambda: SQLiteMemory(folder / "bench.sqlite3")}
        if postgres is not None:
            stores["postgres"] = postgres
        try:
            bots = {name: make_bot({"limits": {"max_pending": 2000}}, generator=InstantGenerator(), memory=make())
                    for name, make in stores.items()}
            loop = asyncio.new_event_loop()
            rates: dict[str, list[float]] = {name: [] for name in bots}
            reads: dict[str, list[float]] = {name: [] for name in bots}
            writes: dict[str, list[float]] = {name: [] for name in bots}
            for name, bot in bots.items():  # warm-up: connections, caches, the first pages
                loop.run_until_complete(messages_per_second(bot, "warm"))
            for round_ in range(args.rounds):
                for name, bot in bots.items():  # interleaved, so that noise hits every store alike
                    rates[name].append(loop.run_until_complete(messages_per_second(bot, f"r{round_}")))
                    read, write = loop.run_until_complete(call_latencies(bot, f"r{round_}"))
                    reads[name] += read
                    writes[name] += write
            for bot in bots.values():
                bot.close()
            loop.close()
        finally:
            if server is not None:
                server.stop()

    baseline = statistics.median(rates["memory"])
    results = {}
    print(f"{'store':<10} {'messages/s':>11} {'x memory':>9} {'recent() ms':>16} {'add() ms':>16}")
    print(f"{'':<10} {'(median)':>11} {'':>9} {'median / p95':>16} {'median / p95':>16}")
    for name in bots:
        rate = statistics.median(rates[name])
        results[name] = {
            "messages_per_second": rate, "ratio_to_memory": rate / baseline,
            "recent_ms": [1000 * statistics.median(reads[name]), 1000 * percentile(reads[name], 0.95)],
            "add_ms": [1000 * statistics.median(writes[name]), 1000 * percentile(writes[name], 0.95)],
        }
        row = results[name]
        print(f"{name:<10} {rate:>11.0f} {row['ratio_to_memory']:>9.2f} "
              f"{row['recent_ms'][0]:>7.2f} / {row['recent_ms'][1]:<6.2f} {row['add_ms'][0]:>7.2f} / {row['add_ms'][1]:<6.2f}")
    if why_not:
        print(f"postgres   skipped: {why_not}")
    print(f"({args.rounds} rounds of {CHATS * USERS_PER_CHAT * MESSAGES_PER_USER} messages per store, interleaved; "
          f"latencies over {200 * args.rounds} calls)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
