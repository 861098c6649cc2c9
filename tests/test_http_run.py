"""`chatforge run` with `adapters.http.enabled: true`, next to Telegram in one process: the issue's done-when.

The real command, a real (tiny) model, the official `openai` client streaming
from it, a fake Telegram Bot API on loopback, and one memory for both.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai

from fake_telegram import FakeTelegram
from processes import terminate

CHATFORGE = str(Path(sys.executable).parent / "chatforge")
TELEGRAM_TOKEN = "987654321:AAF-http-run-telegram-token"
API_KEY = "sk-run-test-key-42"


def wait_for_port(stderr: Path, process: subprocess.Popen, timeout: float = 120) -> int:
    """The port of the "http: connected as http://127.0.0.1:PORT" line, once it is logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"http: connected as http://127\.0\.0\.1:(\d+)", stderr.read_text())
        if found:
            return int(found.group(1))
        assert process.poll() is None, stderr.read_text()
        time.sleep(0.2)
    raise AssertionError(f"the HTTP adapter did not start within {timeout} s:\n{stderr.read_text()}")


def test_chatforge_run_serves_the_openai_client_next_to_telegram(tmp_path, tiny_gpt2, model_cache):
    with FakeTelegram(TELEGRAM_TOKEN) as telegram_api:
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
              http:
                enabled: true
                port: 0
                api_keys: ${{RUN_API_KEYS}}
              telegram:
                enabled: true
                token: ${{RUN_TELEGRAM_TOKEN}}
                base_url: {telegram_api.base_url}
                poll_timeout: 2
        """))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN_TELEGRAM_TOKEN": TELEGRAM_TOKEN, "RUN_API_KEYS": API_KEY}
        stderr = tmp_path / "stderr.txt"
        with stderr.open("w") as err:
            process = subprocess.Popen([CHATFORGE, "run", "--config", str(config)], env=env, cwd=tmp_path,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            port = wait_for_port(stderr, process)
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
            model = api.models.list().data[0].id
            assert model == "chatforge"

            stream = api.chat.completions.create(model=model, stream=True,
                                                 messages=[{"role": "user", "content": "hello there"}])
            chunks = list(stream)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            assert text.strip(), "the model's reply streamed no text"
            assert chunks[-1].choices[0].finish_reason == "stop"

            answer = api.chat.completions.create(model=model,
                                                 messages=[{"role": "user", "content": "/sentiment I love it"}])
            assert answer.choices[0].message.content.startswith("positive (+")

            telegram_api.enqueue_message("/sentiment I love it", chat_id=555, user_id=777)
            sent = telegram_api.wait_for(lambda: telegram_api.sent_messages(555), 60, "a Telegram reply")
            assert sent[0].params["text"].startswith("positive (+")

            with sqlite3.connect(tmp_path / "memory.sqlite3") as db:
                rows = db.execute("SELECT json_extract(conversation, '$[0]'), role, text FROM turns").fetchall()
            assert ("http", "user", "hello there") in rows  # the generator's turn is remembered
        finally:
            status = terminate(process, 30)
    log = stderr.read_text()
    assert status == 0, log
    assert API_KEY not in log and TELEGRAM_TOKEN not in log
