"""Chat with the bot in a terminal, or drive it from a script through a pipe.

On a terminal: line editing and history (prompt_toolkit), replies streamed
as they are generated. Ctrl-C stops a reply (or clears the line at the
prompt), Ctrl-D leaves. When stdin is not a terminal, or with `--json`: one
message per input line, each reply printed in full (or as one JSON object
per input line), and the program ends at the end of input, so
`printf 'hi\\n/help\\n' | chatforge chat` works in a script.

The console is the operator's own terminal, so per-user rate limits do not
apply to it; the engine's queue bound and per-conversation order still do.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import getpass
import json
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Literal

from prompt_toolkit.history import FileHistory, InMemoryHistory
from pydantic import BaseModel, ConfigDict

from chatforge.adapter import Adapter
from chatforge.guard import too_long
from chatforge.hookspecs import hookimpl
from chatforge.message import Message, Reply

MAX_LINE_CHARS = 2**20
"""Characters of one input line kept at most; a longer line is refused by its length, never held whole."""
STOPPED = " [stopped by Ctrl-C; this reply is not kept in memory]"


class ConsoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = ""
    """Who you are in memory; default: your login name (`chatforge chat --user NAME` overrides it)."""
    prompt: str = "you> "
    stream: bool = True
    history_file: str = "~/.local/state/chatforge/console-history"
    """Line-editing history (Up arrow); `memory.redact` applies to it and `/forget` empties it."""
    output: Literal["text", "json"] = "text"
    """json: read lines even on a terminal and print one JSON object per input line (`chatforge chat --json`)."""


class ConsoleAdapter(Adapter):
    name = "console"
    Config = ConsoleConfig

    def __init__(self, engine, config: ConsoleConfig | None) -> None:
        super().__init__(engine, config or ConsoleConfig())
        self._stopping = False
        self._history_forgotten = False
        engine.on_forget_user(self._forget_history)

    @property
    def user(self) -> str:
        return self.config.user or _login_name()

    def message(self, text: str) -> Message:
        return Message(text=text, platform="console", chat="console", user=self.user,
                       display_name=self.user, direct=True)

    async def run(self) -> None:
        if self.config.output == "text" and sys.stdin.isatty() and sys.stdout.isatty():
            await self._interactive()
        else:
            await self._lines()

    async def stop(self) -> None:
        self._stopping = True

    # ------------------------------------------------------------ pipes and scripts

    async def _lines(self) -> None:
        lines = StdinLines(await _stdin_reader(), keep=MAX_LINE_CHARS)
        while not self._stopping:
            line = await lines.next()
            if line is None:
                return
            text, length = line
            if length > len(text):  # cut while reading: refuse it by its length, as the engine would
                reply: Reply | None = Reply(too_long(length, self.engine.settings.limits.max_message_chars),
                                            source="engine", remember=False)
                text += "…"
            else:
                reply = await self.engine.handle(self.message(text), rate_limit=False)
            if self.config.output == "json":
                print(json.dumps({"input": text, "reply": reply.text if reply else None,
                                  "source": reply.source if reply else None}, ensure_ascii=False), flush=True)
            elif reply:
                print(reply.text, flush=True)

    # ------------------------------------------------------------ the terminal

    async def _interactive(self) -> None:
        bot = self.engine.name
        session = self._session()
        print(f"Chatting with {bot}. {self.engine.command_prefix}help lists the commands; "
              f"Ctrl-C stops a reply, Ctrl-D leaves.")
        while not self._stopping:
            try:
                text = await session.prompt_async(self.config.prompt)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: the line is cleared, as in a shell
                continue
            except EOFError:
                print("Bye.")
                return
            streamed: list[str] = []

            def show(piece: str) -> None:
                if not streamed:
                    print(f"{bot}> ", end="")
                streamed.append(piece)
                print(piece, end="", flush=True)

            on_text = show if self.config.stream else None
            reply = await interruptible(self.engine.handle(self.message(text), on_text, rate_limit=False))
            if reply is INTERRUPTED:
                print(STOPPED if streamed else f"{bot}>{STOPPED}", flush=True)
            elif streamed:
                print(flush=True)
            elif reply is not None:
                print(f"{bot}> {reply.text}", flush=True)
            if self._history_forgotten:
                self._history_forgotten = False
                session = self._session()

    def _session(self):
        from prompt_toolkit import PromptSession

        try:
            history = PrivateFileHistory(self._history_path(), self.engine.private)
        except OSError:
            history = InMemoryHistory()
        return PromptSession(history=history)

    def _history_path(self) -> Path:
        return Path(os.path.expanduser(self.config.history_file))

    def _forget_history(self, message: Message) -> None:
        """`/forget` from this console's user also empties the line-editing history."""
        if message.platform != "console" or message.user != self.user:
            return
        with contextlib.suppress(FileNotFoundError):
            self._history_path().write_text("")
        self._history_forgotten = True  # the prompt session, which holds the old lines, is replaced


class PrivateFileHistory(FileHistory):
    """prompt_toolkit's history file, with `memory.redact` applied to what is written."""

    def __init__(self, path: Path, redact: Callable[[str], str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(path))
        self.redact = redact

    def store_string(self, string: str) -> None:
        super().store_string(self.redact(string))


# ---------------------------------------------------------------- Ctrl-C during a reply

INTERRUPTED = Reply("", source="console", remember=False)


async def interruptible(work: Awaitable[Reply | None]) -> Reply | None:
    """Await `work`; Ctrl-C (the key, or a SIGINT) cancels it and gives INTERRUPTED.

    The terminal is kept in raw mode meanwhile, so Ctrl-C arrives as a key and
    no SIGINT reaches the processes around chatforge (`make chat` would
    otherwise end with status 130 after the chat).
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    with _ctrl_c_calls(task.cancel), _sigint_calls(loop, task.cancel):
        try:
            return await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the console itself is being stopped
            return INTERRUPTED


@contextlib.contextmanager
def _ctrl_c_calls(callback: Callable[[], object]) -> Iterator[None]:
    from prompt_toolkit.input import create_input
    from prompt_toolkit.keys import Keys

    keyboard = create_input()

    def keys_ready() -> None:
        if any(press.key == Keys.ControlC for press in keyboard.read_keys()):
            callback()

    try:
        with keyboard.raw_mode(), keyboard.attach(keys_ready):
            yield
    finally:
        keyboard.close()


@contextlib.contextmanager
def _sigint_calls(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> Iterator[None]:
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


# ---------------------------------------------------------------- reading stdin

ReadChunk = Callable[[], Awaitable[bytes]]


class StdinLines:
    """Lines from a byte source, each cut at `keep` characters but measured whole.

    A line of many megabytes costs no memory and does not stop the reader:
    `next()` gives its first `keep` characters and its full length, so it can
    be refused politely while the lines after it are still answered.
    """

    def __init__(self, read: ReadChunk, keep: int) -> None:
        self.read = read
        self.keep = keep
        self._buffer = b""
        self._eof = False

    async def next(self) -> tuple[str, int] | None:
        """(text, length in characters) of the next line, without its newline; None at the end."""
        if self._eof and not self._buffer:
            return None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        kept: list[str] = []
        kept_chars = length = 0
        while True:
            if not self._buffer and not self._eof:
                self._buffer = await self.read()
                self._eof = not self._buffer
            newline = self._buffer.find(b"\n")
            end = newline >= 0 or self._eof
            piece, self._buffer = ((self._buffer[:newline], self._buffer[newline + 1:]) if newline >= 0
                                   else (self._buffer, b""))
            text = decoder.decode(piece, final=end)
            length += len(text)
            if kept_chars < self.keep:
                kept.append(text[: self.keep - kept_chars])
                kept_chars += len(kept[-1])
            if end:
                break
        line = "".join(kept)
        if line.endswith("\r"):
            line, length = line[:-1], length - 1
        if self._eof and not line and not length and newline < 0:
            return None
        return line, length


async def _stdin_reader() -> ReadChunk:
    """A chunk reader for stdin that does not block the event loop (nor shutdown, on a pipe)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):  # a regular file: reading it never waits long
        async def from_thread() -> bytes:
            return await asyncio.to_thread(sys.stdin.buffer.read1, 2**16)
        return from_thread

    async def from_pipe() -> bytes:
        return await reader.read(2**16)
    return from_pipe


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "user"


@hookimpl
def chatforge_register_adapters(register) -> None:
    register(ConsoleAdapter)
