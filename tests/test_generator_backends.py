"""Generator backends are plugins: chosen by `generator.backend`, each validating its own keys.

A third-party backend here is a plugin file loaded from the config, like any
plugin; the built-in transformers backend registers through the same hook.
Everything runs the real `chatforge` command.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from chatforge.config import GeneratorConfig, Settings, load_settings_from_dict
from chatforge.plugin_manager import PluginHost
from chatforge.local.transformers_backend import TransformersBackend

ECHO_BACKEND = '''
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from chatforge import hookimpl
from chatforge.generation import GeneratorBackend


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["echo"]
    prefix: str = "echo"
    repeat: int = Field(1, ge=1)


class EchoGenerator:
    def __init__(self, config):
        self.config = config
        self.name = f"echo x{config.repeat}"

    async def reply(self, history, text, on_text=None):
        heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
        return f"{self.config.prefix}: {text * self.config.repeat} (history {len(history)}, loaded {heavy})"

    async def complete(self, instruction, max_new_tokens=None):
        return f"{self.config.prefix}: {instruction}"

    async def close(self):
        print("echo backend closed", file=sys.stderr)


class EchoBackend(GeneratorBackend):
    name = "echo"
    Config = EchoConfig

    @classmethod
    def create(cls, config, settings):
        return EchoGenerator(config)


@hookimpl
def chatforge_register_generators(register):
    register(EchoBackend)
'''


def echo_config(folder: Path, generator: str) -> Path:
    (folder / "echo_backend.py").write_text(ECHO_BACKEND)
    config = folder / "config.yaml"
    config.write_text("generator:\n" + textwrap.indent(textwrap.dedent(generator).strip(), "  ") + "\n"
                      + textwrap.dedent("""\
                          memory:
                            path: memory.sqlite3
                          plugins:
                            echo:
                              module: ./echo_backend.py
                          """))
    return config


def test_a_third_party_backend_answers_with_its_own_keys_and_torch_is_never_imported(cli, tmp_path):
    config = echo_config(tmp_path, "backend: echo\nprefix: said\nrepeat: 2")
    result = cli("chat", "-c", str(config), stdin="hi\nagain\n/summarize one. two. three.\n")
    assert result.returncode == 0, result.stderr
    assert "said: hihi (history 0, loaded [])" in result.stdout
    assert "said: againagain (history 2, loaded [])" in result.stdout
    assert "echo backend closed" in result.stderr  # an async close() is awaited
    assert "Traceback" not in result.stderr


def test_a_backends_keys_are_validated_by_its_own_model_with_yaml_lines(cli, tmp_path):
    config = echo_config(tmp_path, "backend: echo\nrepeat: 0\nprefx: oops\nmodel: gpt2")
    result = cli("config", "check", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{config}:3: generator.repeat: must be greater than or equal to 1, got 0" in result.stderr
    assert f"{config}:4: generator.prefx: unknown key (did you mean \"prefix\"?)" in result.stderr, result.stderr
    assert f"{config}:5: generator.model: unknown key (known keys: backend, prefix, repeat)" in result.stderr


def test_an_unknown_backend_is_one_line_naming_the_available_ones(cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("generator:\n  backend: transformer\n  model: gpt2\n")
    result = cli("config", "check", "-c", str(config))
    assert result.returncode == 2
    assert (f'{config}:2: generator.backend: no generator backend named "transformer" (available: '
            in result.stderr), result.stderr
    assert 'transformers); did you mean "transformers"?' in result.stderr
    assert "Traceback" not in result.stderr


def test_chatforge_plugins_lists_the_backends_and_the_chosen_one(cli, tmp_path):
    config = echo_config(tmp_path, "backend: echo")
    result = cli("plugins", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "  generator backends: echo (chosen)" in result.stdout
    assert "  generator backends: transformers\n" in result.stdout


def test_todays_generator_keys_still_belong_to_the_default_backend():
    written = {"generator": {"model": "gpt2", "quantize": "int8", "runtime": "torch", "temperature": 0.3}}
    settings = load_settings_from_dict(written)
    assert isinstance(settings.generator, GeneratorConfig) and settings.generator.backend == "transformers"
    assert settings.generator.quantize == "int8" and settings.generator.model_fields_set >= {"temperature"}
    host = PluginHost(settings)
    assert host.load() == []
    assert host.generator_backend is TransformersBackend and host.generator_config is settings.generator
    assert Settings().generator == load_settings_from_dict({}).generator


def test_the_default_backend_is_registered_through_the_hook_like_any_other():
    host = PluginHost(load_settings_from_dict({}))
    host.load()
    assert host.infos["transformers"].generators == ["transformers"]
    assert host.infos["transformers"].source == "builtin"


def test_a_second_backend_under_a_taken_name_is_that_plugins_failure(tmp_path):
    from chatforge import hookimpl

    class Impostor(TransformersBackend):
        pass

    class Plugin:
        @hookimpl
        def chatforge_register_generators(self, register):
            register(Impostor)

    host = PluginHost(load_settings_from_dict({}))
    host.load(extra_plugins={"impostor": Plugin()})
    # pluggy calls the later-registered plugin first, so the impostor keeps the name; the other is reported
    assert host.generators["transformers"] is Impostor
    [error] = host.infos["transformers"].errors
    assert error.startswith("chatforge_register_generators: ValueError: generator backend 'transformers' is "
                            "already registered")


# ---------------------------------------------------------------- the openai backend through the CLI


def openai_config(folder: Path, base_url: str, extra: str = "") -> Path:
    config = folder / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        generator:
          backend: openai
          base_url: {base_url}
          model: smollm2
          api_key: ${{TEST_OPENAI_KEY:-}}
          timeout: 2
          max_retries: 0
        memory:
          path: memory.sqlite3
        """) + textwrap.dedent(extra))
    return config


def test_chat_answers_through_a_model_server_with_memory_and_no_torch(cli, tmp_path):
    from fake_openai import FakeOpenAI

    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent('''
        import sys
        from chatforge import hookimpl

        @hookimpl
        def chatforge_register_commands(register):
            register("heavy", lambda ctx: str(sorted(m for m in ("torch", "transformers") if m in sys.modules)),
                     help="which heavy modules are loaded")
        '''))
    with FakeOpenAI() as server:
        config = openai_config(tmp_path, server.base_url, "plugins:\n  probe:\n    module: ./probe.py\n")
        result = cli("chat", "-c", str(config), stdin="What is the capital of France?\nand Italy?\n/heavy\n",
                     env={"TEST_OPENAI_KEY": "sk-test-SECRET-1234"})
        requests = server.chat_requests()
    assert result.returncode == 0, result.stderr
    assert "You said: What is the capital of France?" in result.stdout
    assert "You said: and Italy?" in result.stdout
    assert "[]" in result.stdout.splitlines()[-1]  # neither torch nor transformers was imported
    assert [m["role"] for m in requests[-1].messages] == ["system", "user", "assistant", "user"]
    assert requests[-1].headers.get("Authorization") == "Bearer sk-test-SECRET-1234"
    assert "SECRET" not in result.stderr and "Traceback" not in result.stderr


def test_a_model_server_that_is_down_gets_an_apology_naming_it_and_the_bot_goes_on(cli, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = openai_config(tmp_path, f"http://127.0.0.1:{port}/v1")
    result = cli("chat", "-c", str(config), stdin="hello\n/help\n")
    assert result.returncode == 0, result.stderr
    assert (f"Sorry, something went wrong while answering (the model server at 127.0.0.1:{port} failed). "
            "Please try again.") in result.stdout
    assert "Commands:" in result.stdout  # commands still work
    warnings = [line for line in result.stderr.splitlines() if f"127.0.0.1:{port}" in line]
    assert warnings and "Traceback" not in result.stderr


def serve_with_model_server(folder: Path, base_url: str, adapter: str, env: dict[str, str]):
    """`chatforge run` with `backend: openai` and one platform adapter; output goes to files."""
    import os
    import subprocess
    import sys

    config = openai_config(folder, base_url, adapter)
    out, err = (folder / "stdout.txt").open("w"), (folder / "stderr.txt").open("w")
    process = subprocess.Popen([str(Path(sys.executable).parent / "chatforge"), "run", "-c", str(config)],
                               stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=folder,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    return process, folder / "stderr.txt"


def test_telegram_streams_a_model_servers_reply(tmp_path):
    from fake_openai import FakeOpenAI
    from fake_telegram import FakeTelegram
    from processes import terminate

    token = "123456789:AAF-fake-test-token-Zq8xW"
    with FakeOpenAI(chunk_delay=0.1) as server, FakeTelegram(token) as telegram:
        process, stderr = serve_with_model_server(tmp_path, server.base_url, textwrap.dedent(f"""\
            adapters:
              console: {{enabled: false}}
              telegram: {{enabled: true, token: "${{TG}}", base_url: "{telegram.base_url}", poll_timeout: 2,
                          stream: true, stream_interval: 0.3}}
            """), {"TG": token})
        try:
            telegram.wait_for(lambda: telegram.count("getUpdates") > 0, 60, "the bot to poll")
            telegram.enqueue_message("tell me a long story about the sea please", chat_id=42, user_id=42)
            telegram.wait_for(lambda: any("about the sea please" in call.params.get("text", "")
                                          for call in telegram.calls_to("editMessageText", chat_id=42)),
                              30, "the streamed reply's last edit")
        finally:
            status = terminate(process, 15)
        assert status == 0, stderr.read_text()
        first = telegram.sent_messages(42)[0].params["text"]
        assert first and "about the sea please" not in first  # the first words came before the whole reply
        assert "Traceback" not in stderr.read_text()


def test_discord_answers_with_a_model_servers_reply(tmp_path):
    from fake_discord import CHANNEL_ID, FakeDiscord, user
    from fake_openai import FakeOpenAI
    from processes import terminate

    token = "test-token-Zq8xWv3Kp"
    alice = user("100000000000000001", "alice")
    with FakeOpenAI() as server, FakeDiscord(token) as discord:
        process, stderr = serve_with_model_server(tmp_path, server.base_url, textwrap.dedent(f"""\
            adapters:
              console: {{enabled: false}}
              discord: {{enabled: true, token: "${{DC}}", api_base: "{discord.api_base}",
                         gateway_url: "{discord.gateway_url}", respond_to: [all]}}
            """), {"DC": token})
        try:
            discord.wait_ready(60)
            since = discord.mark()
            discord.dispatch_message("hello from discord", alice)
            replies = discord.wait_until(
                lambda: [r for r in discord.sent_messages(CHANNEL_ID, since)
                         if "You said: hello from discord" in ((r.body or {}).get("content") or "")],
                30, "the model server's reply")
        finally:
            status = terminate(process, 15)
        assert status == 0, stderr.read_text()
        assert replies and "Traceback" not in stderr.read_text()
