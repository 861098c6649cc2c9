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


def leave(child: pexpect.spawn) -> int:
    """Ctrl-D at the prompt: the chat says goodbye and ends; its exit status."""
    child.sendeof()
    child.expect("Bye.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None
    return child.exitstatus


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
    assert leave(child) == 0
    assert "hello there" in (tty_config.parent / "history").read_text()  # line-editing history kept


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_leaves(tty_config):
    child = spawn(tty_config)
    child.expect_exact("me>")
    child.send("half a thought")
    child.sendintr()
    child.expect_exact("me>")
    child.sendline("/history")
    child.expect("I don't remember anything of this conversation yet.")
    child.expect_exact("me>")
    assert leave(child) == 0
    assert "half a thought" not in (tty_config.parent / "history").read_text()


SLOW_GENERATOR = '''
import asyncio
from chatforge import hookimpl

class SlowGenerator:
    """Streams a word every 0.1 s for at most a minute, like a big model on a slow machine."""
    name = "slow"

    async def reply(self, history, text, on_text=None):
        for index in range(600):
            await asyncio.sleep(0.1)
            if on_text is not None:
                on_text(f"word{index} ")
        return "finished"

    async def complete(self, instruction, max_new_tokens=None):
        return ""

    def close(self):
        pass

@hookimpl
def chatforge_startup(bot):
    bot.generator.close()
    bot.generator = SlowGenerator()
'''


def test_ctrl_c_during_a_streamed_reply_stops_it_and_returns_to_the_prompt(tty_config):
    (tty_config.parent / "slow.py").write_text(SLOW_GENERATOR)
    with tty_config.open("a") as config:
        config.write("plugins:\n  slow:\n    module: slow.py\n")
    child = spawn(tty_config)
    child.expect_exact("me>")
    child.sendline("tell me a long story")
    child.expect("chatforge> word0 word1 ")
    child.sendintr()
    child.expect_exact("[stopped by Ctrl-C; this reply is not kept in memory]")
    child.expect_exact("me>")
    child.sendline("/history")  # the cut reply was dropped, and so was its question
    child.expect("I don't remember anything of this conversation yet.")
    child.expect_exact("me>")
    assert leave(child) == 0
    assert "word50" not in child.before


def test_the_line_history_is_redacted_and_emptied_by_forget(tty_config):
    tty_config.write_text(tty_config.read_text().replace("  backend: memory\n", "  backend: memory\n  redact: [email]\n"))
    history = tty_config.parent / "history"
    child = spawn(tty_config)
    child.expect_exact("me>")
    child.sendline("/sentiment write to ada@example.org please")
    child.expect("chatforge> (positive|neutral|negative)")
    child.expect_exact("me>")
    assert "write to [email] please" in history.read_text()
    assert "ada@example.org" not in history.read_text()
    child.sendline("/forget")
    child.expect("chatforge> (I keep nothing about you|Done: I deleted)")
    child.expect_exact("me>")
    assert "sentiment" not in history.read_text()
    child.sendline("/help")
    child.expect("chatforge> Commands:")
    child.expect_exact("me>")
    assert leave(child) == 0
    assert "/help" in history.read_text() and "sentiment" not in history.read_text()
