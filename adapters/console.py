"""Chat with the bot in a terminal, or drive it from a script through a pipe.

On a terminal: line editing and history (prompt_toolkit), replies streamed
as they are generated, Ctrl-C or Ctrl-D to leave. When stdin is not a
terminal: one message per input line, each reply printed in full, and the
program ends at the end of input, so `printf 'hi\\n/help\\n' | chatforge chat`
works in a script.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from chatforge.adapter import Adapter
from chatforge.hookspecs import hookimpl
from chatforge.message import Message


class ConsoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = ""
    """Who you are in memory; default: your login name."""
    prompt: str = "you> "
    stream: bool = True
    history_file: str = "~/.local/state/chatforge/console-history"


class ConsoleAdapter(Adapter):
    name = "console"
    Config = ConsoleConfig

    def __init__(self, engine, config: ConsoleConfig | None) -> None:
        super().__init__(engine, config or ConsoleConfig())
        self._stopping = False

    def message(self, text: str) -> Message:
        user = self.config.user or _login_name()
        return Message(text=text, platform="console", chat="console", user=user,
                       display_name=user, direct=True)

    async def run(self) -> None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            await self._interactive()
        else:
            await self._pipe()

    async def stop(self) -> None:
        self._stopping = True

    async def _pipe(self) -> None:
        lines = await _stdin_lines()
        while not self._stopping:
            line = await lines()
            if not line:
                return
            reply = await self.engine.handle(self.message(line.rstrip("\r\n")))
            if reply is not None:
                print(reply.text, flush=True)

    async def _interactive(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history_path = Path(os.path.expanduser(self.config.history_file))
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_path))
        except OSError:
            history = InMemoryHistory()
        session: PromptSession[str] = PromptSession(history=history)
        bot = self.engine.name
        print(f"Chatting with {bot}. {self.engine.command_prefix}help lists the commands; Ctrl-D leaves.")
        while not self._stopping:
            try:
                text = await session.prompt_async(self.config.prompt)
            except (EOFError, KeyboardInterrupt):
                print("Bye.")
                return
            streamed: list[str] = []

            def show(piece: str) -> None:
                if not streamed:
                    print(f"{bot}> ", end="")
                streamed.append(piece)
                print(piece, end="", flush=True)

            reply = await self.engine.handle(self.message(text), on_text=show if self.config.stream else None)
            if streamed:
                print(flush=True)
            elif reply is not None:
                print(f"{bot}> {reply.text}", flush=True)


async def _stdin_lines():
    """A `readline` for stdin that does not block the event loop (nor shutdown, on a pipe)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**22)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):  # a regular file: reading it never waits long
        async def from_thread() -> str:
            return await asyncio.to_thread(sys.stdin.readline)
        return from_thread

    async def from_pipe() -> str:
        return (await reader.readline()).decode("utf-8", errors="replace")
    return from_pipe


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "user"


@hookimpl
def chatforge_register_adapters(register) -> None:
    register(ConsoleAdapter)
