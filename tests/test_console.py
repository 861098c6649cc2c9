"""The console adapter on a real pseudo-terminal: prompt, streamed replies, Ctrl-D and Ctrl-C."""

from __future__ import annotations

import os
import textwrap

import pexpect
import pytest

from conftest import CHATFORGE  # noqa: E402 - the installed command, shared with the CLI tests


@pytest.fixture
def tty_config(tmp_path, tiny_gpt2, model_cache):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        generator:
          model: {tiny_gpt2}
          temperature: 0
          max_new_tokens: 8
          cache_dir: {model_cache}
        memory:
          backend: memory
        adapters:
          console:
            user: tester
            prompt: "me> "
            history_file: {tmp_path / 'history'}
    """))
    return path


def spawn(config) -> pexpect.spawn:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    return pexpect.spawn(CHATFORGE, ["chat", "-c", str(config)], env=env, encoding="utf-8",
                         timeout=60, dimensions=(40, 200))


def test_terminal_chat_streams_replies_and_ends_on_ctrl_d(tty_config):
    child = spawn(tty_config)
    child.expect("Chatting with chatforge")
    child.expect_exact("me>")
    child.sendline("/history")
    child.expect("chatforge> I don't remember anything of this conversation yet.")
    child.expect_exact("me>")
    child.sendline("hello there")
    child.expect("chatforge> ")
    child.expect_exact("me>")
    child.sendline("/history")
    child.expect("You: hello there")
    child.expect_exact("me>")
    child.sendeof()
    child.expect("Bye.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "hello there" in (tty_config.parent / "history").read_text()  # line-editing history kept


def test_ctrl_c_at_the_prompt_ends_cleanly(tty_config):
    child = spawn(tty_config)
    child.expect_exact("me>")
    child.sendintr()
    child.expect("Bye.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
