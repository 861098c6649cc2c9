"""Discord and Telegram served at once by one `chatforge run`: one engine, one generator, one memory."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from fake_discord import FakeDiscord, user
from fake_telegram import FakeTelegram
from processes import terminate

CHATFORGE = str(Path(sys.executable).parent / "chatforge")
DISCORD_TOKEN = "multi-discord-token-Zq8xW"
TELEGRAM_TOKEN = "987654321:AAF-multi-telegram-token"
ALICE = user("100000000000000011", "alice")


def test_discord_and_telegram_in_one_process(tmp_path, tiny_gpt2, model_cache):
    with FakeDiscord(DISCORD_TOKEN) as discord_api, FakeTelegram(TELEGRAM_TOKEN) as telegram_api:
        config = tmp_path / "config.yaml"
        config.write_text(textwrap.dedent(f"""
            generator:
              model: {tiny_gpt2}
              temperature: 0
              max_new_tokens: 8
              cache_dir: {model_cache}
            memory:
              path: {tmp_path / "memory.sqlite3"}
            adapters:
              discord:
                enabled: true
                token: ${{MULTI_DISCORD_TOKEN}}
                api_base: {discord_api.api_base}
                gateway_url: {discord_api.gateway_url}
              telegram:
                enabled: true
                token: ${{MULTI_TELEGRAM_TOKEN}}
                base_url: {telegram_api.base_url}
                poll_timeout: 2
        """))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MULTI_DISCORD_TOKEN": DISCORD_TOKEN,
               "MULTI_TELEGRAM_TOKEN": TELEGRAM_TOKEN}
        with (tmp_path / "stderr.txt").open("w") as err:
            process = subprocess.Popen([CHATFORGE, "run", "--config", str(config)], env=env, cwd=tmp_path,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            discord_api.wait_ready(timeout=120)
            telegram_api.wait_for(lambda: telegram_api.count("getUpdates") > 0, 120, "Telegram polling")

            dm = discord_api.dispatch_dm("/sentiment I love it", ALICE)
            telegram_api.enqueue_message("/sentiment I love it", chat_id=555, user_id=777)
            reply = discord_api.wait_for(
                "POST", r"/channels/\d+/messages", timeout=60,
                where=lambda r: str(((r.body or {}).get("message_reference") or {}).get("message_id")) == dm)[0]
            assert reply.body["content"].startswith("positive (+")
            sent = telegram_api.wait_for(lambda: telegram_api.sent_messages(555), 60, "a Telegram reply")
            assert sent[0].params["text"].startswith("positive (+")

            discord_api.dispatch_dm("remember me on discord", ALICE)
            telegram_api.enqueue_message("remember me on telegram", chat_id=555, user_id=777)

            def platforms() -> set[str]:
                with sqlite3.connect(tmp_path / "memory.sqlite3") as db:
                    return {row[0] for row in db.execute("SELECT json_extract(conversation, '$[0]') FROM turns")}

            assert telegram_api.wait_for(lambda: platforms() == {"discord", "telegram"}, 60, "both in one memory")
        finally:
            status = terminate(process, 30)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert status == 0, stderr
    assert DISCORD_TOKEN not in stderr and TELEGRAM_TOKEN not in stderr
