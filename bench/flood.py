"""A flood into one Telegram chat: what is answered, what is refused, and what it costs in memory.

Starts the real `chatforge run` (Telegram adapter, python-telegram-bot) against
the loopback fake Bot API of the tests, with a tiny random GPT-2 whose replies
are replaced by a 2-second scripted stream, so that messages pile up. Then it
sends --messages messages into one chat at once and reports how many were
answered by the model, how many "busy" answers were sent, and the bot's
resident memory (VmRSS) before and at its peak. As a baseline in the same run,
a second bot gets exactly `limits.max_pending` (64) messages, which are all
admitted: the flood should cost about what the baseline costs.

    .venv/bin/python bench/flood.py [--messages 3000] [--json out.json]

Needs the test extra (`make setup` installs it) and takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_tiny_gpt2  # noqa: E402
from fake_telegram import FakeTelegram  # noqa: E402
from test_telegram import SLOW_PLUGIN, TOKEN, Bot, texts, wait_until_polling, write_config  # noqa: E402

MAX_PENDING = 64
WAIT = 600  # seconds at most for the admitted messages' answers (2 s each, one chat answers one at a time)


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def flood(folder: Path, model: Path, count: int) -> dict:
    """`count` messages into one chat of a fresh bot; its answers and memory."""
    folder.mkdir()
    chat = 9001
    with FakeTelegram(TOKEN) as fake:
        config = write_config(folder, model, folder / "cache", fake.base_url, plugins={"slow": SLOW_PLUGIN})
        config.write_text(config.read_text().replace("limits:", f"limits:\n  max_pending: {MAX_PENDING}", 1))
        bot = Bot(config)
        try:
            wait_until_polling(fake, bot)
            time.sleep(2)
            before = peak = resident_mb(bot.process.pid)
            started = time.monotonic()
            for n in range(count):
                fake.enqueue_message(f"flood {n}", chat_id=chat, user_id=chat)
            expected = min(count, MAX_PENDING)
            while time.monotonic() - started < WAIT:
                peak = max(peak, resident_mb(bot.process.pid))
                answered = [text for text in texts(fake.sent_messages(chat)) if text.startswith("word0")]
                if len(answered) >= expected:
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            sent = texts(fake.sent_messages(chat))
        finally:
            bot.terminate()
    return {"messages": count, "answered": sum(text.startswith("word0") for text in sent),
            "busy": sum("busy" in text for text in sent), "sent": len(sent), "seconds": round(elapsed, 1),
            "rss_before_mb": round(before), "rss_peak_mb": round(peak), "rss_growth_mb": round(peak - before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_gpt2(Path(scratch) / "model")
        rows = [flood(Path(scratch) / "baseline", model, MAX_PENDING),
                flood(Path(scratch) / "flood", model, args.messages)]
    for name, row in zip(["baseline", "flood"], rows):
        print(f"{name}: {row['messages']} messages into one chat -> {row['answered']} answered, "
              f"{row['busy']} busy, {row['sent']} sent in {row['seconds']} s; "
              f"RSS {row['rss_before_mb']} -> {row['rss_peak_mb']} MB (+{row['rss_growth_mb']})")
    baseline, flooded = rows
    print(f"memory growth, flood / baseline: {flooded['rss_growth_mb']:.1f} MB / {baseline['rss_growth_mb']:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
