"""`generator.backend: openai`: answers come from a model server speaking the OpenAI chat API.

vLLM, Hugging Face TGI, Ollama, LM Studio, llama.cpp's server and OpenAI itself
all speak it, so one backend covers a GPU box down the hall and a hosted model.
No local model is loaded; memory, plugins and adapters work as with the local one.

It uses the official `openai` client (async) rather than hand-written HTTP: the
client already retries 408, 409, 429 and 5xx with exponential backoff honouring
`Retry-After` (up to 120 s), parses server-sent events, maps errors to typed
exceptions and keeps up with the API. It is imported only when this backend is
chosen (it takes about a second).

What the client does not do, done here:
- conversation memory goes as system/user/assistant messages, trimmed to a
  token budget, newest kept (no tokenizer: about 4 characters a token);
- `max_concurrent` bounds the requests in flight (the client's pool allows 1,000);
- a stream that ends without a `finish_reason` is an error, not a cut reply
  (the client returns quietly), and so is malformed event data (the client
  raises a bare JSONDecodeError);
- every failure becomes one `ModelServerError` naming the server, never the key;
- a server that is down at start is one warning, and the bot starts anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Sequence
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError

from .config import GeneratorConfig, PositiveInt, Settings, StrictModel
from .generation import GeneratorBackend, OnText, count_usage
from .hookspecs import hookimpl
from .memory import Turn

if TYPE_CHECKING:
    import openai

log = logging.getLogger("chatforge.openai_backend")

PLACEHOLDER_KEY = "no-key"
"""Sent when `api_key` is empty: the client refuses to run without one, and local servers ignore it."""
PROBE_TIMEOUT = 2.0
"""Seconds the start-up check of the server waits."""
CHARS_PER_TOKEN = 4
"""The history budget's estimate (English text, GPT-style tokenizers); no tokenizer is loaded."""
MESSAGE_TOKENS = 4
"""What a chat message costs besides its text (role markers)."""


class ModelServerError(RuntimeError):
    """A reply the model server could not give, after the retries; the message names it, never the key."""


class OpenAIConfig(StrictModel):
    """The `generator:` section for `backend: openai`."""

    backend: Literal["openai"] = "openai"
    """`openai`: answer with a model server speaking the OpenAI API (vLLM, Ollama, llama.cpp's server...)."""
    base_url: str
    """The server's API root, `/v1` included: `http://127.0.0.1:8000/v1`, `https://api.openai.com/v1`."""
    model: Annotated[str, Field(min_length=1)]
    """The model id the server knows (`GET <base_url>/models` lists them)."""
    api_key: SecretStr = SecretStr("")
    """Write `${OPENAI_API_KEY}` rather than the key. Empty for local servers started without one.
    Never logged or shown."""
    timeout: Annotated[float, Field(gt=0)] = 60.0
    """Seconds to wait for the server to start answering, and then between two pieces of a streamed reply."""
    max_retries: Annotated[int, Field(ge=0)] = 2
    """Retries of a request that failed before its reply began (429, 5xx, timeout, refused connection),
    after a backoff or the server's `Retry-After`. A reply that breaks off midway is not retried."""
    max_concurrent: PositiveInt = 8
    """Requests in flight at once, across all chats; more messages wait for a place."""
    temperature: Optional[Annotated[float, Field(ge=0)]] = None
    """Unset (null): the server's default, often the model's recommended one."""
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    """Unset (null): the server's default."""
    max_new_tokens: Optional[PositiveInt] = 256
    """Sent as `max_tokens`; a reply cut by it ends with "…". null: the server's limit."""
    seed: Optional[int] = None
    """For servers that support it: the same seed and input give the same answer."""
    stop: list[str] = []
    """Stop sequences (OpenAI itself accepts up to 4)."""
    system_prompt: str = GeneratorConfig.model_fields["system_prompt"].default
    """The first message of every request; empty: none."""
    history_tokens: Optional[PositiveInt] = None
    """Tokens of conversation history sent at most, estimated at 4 characters a token; the oldest turns
    are left out first. Unset: `memory.max_tokens`."""
    stream: bool = True
    """Stream replies as they are generated (console and chat edits show them growing)."""
    extra_body: dict[str, Any] = {}
    """Other request fields, passed as they are: server-specific sampling such as llama.cpp's or vLLM's
    `top_k`, `repeat_penalty`."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PydanticCustomError(
                "base_url", "must be an http:// or https:// URL, such as http://127.0.0.1:8000/v1")
        return url.strip()


@dataclass(frozen=True)
class RequestStats:
    """How one request went, as the server reported it (for logs, /stats and benchmarks)."""

    prompt_tokens: Optional[int]
    """None when the server reports no usage."""
    new_tokens: Optional[int]
    seconds: float
    """From the request (after waiting for a place) to its last piece, retries included."""
    first_token_seconds: Optional[float]
    """When the first piece of text arrived (streamed replies)."""
    retries: int = 0


def shown_url(base_url: str) -> str:
    """`base_url` without user:password, for logs and messages."""
    parts = urlsplit(base_url)
    if parts.username is None and parts.password is None:
        return base_url
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class OpenAIGenerator:
    """A TextGenerator backed by an OpenAI-compatible server; everything is async, nothing blocks the loop."""

    def __init__(self, config: OpenAIConfig, history_tokens: int) -> None:
        import openai  # only now: about a second to import

        self.config = config
        self.history_tokens = config.history_tokens or history_tokens
        self.url = shown_url(config.base_url)
        self.name = f"{config.model} at {self.url}"
        parts = urlsplit(config.base_url)
        self.failure_source = f"the model server at {parts.hostname}{f':{parts.port}' if parts.port else ''}"
        """What the engine's apology names when a reply fails."""
        self._openai = openai
        self._key = config.api_key.get_secret_value()
        # The key is always given, so an OPENAI_API_KEY in the environment never goes to another server.
        self.client = openai.AsyncOpenAI(base_url=config.base_url, api_key=self._key or PLACEHOLDER_KEY,
                                         timeout=config.timeout, max_retries=config.max_retries)
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._ask_usage = config.stream
        """Ask for token counts in streams (`stream_options`); off once the server refuses the field."""
        self.last_stats: RequestStats | None = None
        self.requests = 0
        self.failures = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        """Totals since start, over the requests whose usage the server reported."""

    # ------------------------------------------------------------ TextGenerator

    async def reply(self, history: Sequence[Turn], text: str, on_text: OnText | None = None) -> str:
        return await self._request(self.messages(history, text), on_text, self.config.max_new_tokens)

    async def complete(self, instruction: str, max_new_tokens: int | None = None) -> str:
        return await self._request(self.messages([], instruction), None,
                                   max_new_tokens or self.config.max_new_tokens)

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.close()

    # ------------------------------------------------------------ messages

    def messages(self, history: Sequence[Turn], text: str) -> list[dict[str, str]]:
        """The chat messages for answering `text` after `history`: system, the newest turns that fit, `text`."""
        system = self.config.system_prompt.strip()
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": turn.role, "content": turn.text} for turn in self._fitting(history)]
        messages.append({"role": "user", "content": text})
        return messages

    def _fitting(self, history: Sequence[Turn]) -> list[Turn]:
        """The newest turns within the token budget, starting with a user turn (some chat templates refuse
        an assistant message right after the system one)."""
        kept: list[Turn] = []
        used = 0
        for turn in reversed(history):
            used += estimated_tokens(turn.text)
            if used > self.history_tokens:
                break
            kept.append(turn)
        kept.reverse()
        while kept and kept[0].role != "user":
            kept.pop(0)
        return kept

    # ------------------------------------------------------------ requests

    def _params(self, messages: list[dict[str, str]], max_tokens: int | None) -> dict[str, Any]:
        config = self.config
        params: dict[str, Any] = {"model": config.model, "messages": messages, "stream": config.stream}
        optional = {"max_tokens": max_tokens, "temperature": config.temperature, "top_p": config.top_p,
                    "seed": config.seed, "stop": config.stop or None}
        params.update({key: value for key, value in optional.items() if value is not None})
        if config.extra_body:
            params["extra_body"] = dict(config.extra_body)
        return params

    async def _request(self, messages: list[dict[str, str]], on_text: OnText | None,
                       max_tokens: int | None) -> str:
        async with self._slots:
            started = time.perf_counter()
            self.requests += 1
            progress = _Progress(on_text)
            try:
                if self.config.stream:
                    raw = await self._start_stream(self._params(messages, max_tokens))
                    progress.answered = True
                    usage = await self._read_stream(raw, progress)
                else:
                    raw = await self.client.chat.completions.with_raw_response.create(
                        **self._params(messages, max_tokens))
                    progress.answered = True
                    usage = self._read_completion(raw.parse(), progress)
            except Exception as exc:
                error = self._failure(exc, progress.answered)
                if error is None:  # not the server's doing (an on_text callback's bug, say): as it is
                    raise
                self.failures += 1
                raise error from exc
        if progress.finish == "length":  # cut by max_tokens: show it, as the local model does
            progress.add("…")
        self._record(usage, time.perf_counter() - started, progress, raw.retries_taken)
        return "".join(progress.pieces)

    async def _start_stream(self, params: dict[str, Any]) -> Any:
        """The stream's response; asks for usage unless the server has refused `stream_options` before."""
        create = self.client.chat.completions.with_raw_response.create
        if not self._ask_usage:
            return await create(**params)
        try:
            return await create(**params, stream_options={"include_usage": True})
        except self._openai.BadRequestError:
            self._ask_usage = False
            try:
                raw = await create(**params)
            except self._openai.BadRequestError:
                self._ask_usage = True  # refused for another reason
                raise
            log.info("the model server at %s refused stream_options; streamed replies report no token counts",
                     self.url)
            return raw

    async def _read_stream(self, raw: Any, progress: "_Progress") -> Any:
        usage = None
        stream = raw.parse()  # with_raw_response's parse() is synchronous: the body is read below
        async with stream:  # closes the HTTP request however this ends: a cancelled reply stops the server
            async for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    if choice.delta is not None and choice.delta.content:
                        progress.add(choice.delta.content)
                    if choice.finish_reason:
                        progress.finish = choice.finish_reason
        if progress.finish is None:
            raise _Incomplete()
        return usage

    def _read_completion(self, completion: Any, progress: "_Progress") -> Any:
        if not completion.choices:
            raise _Incomplete()
        choice = completion.choices[0]
        progress.add(choice.message.content or "")
        # A whole body arrived, so a missing finish_reason (Ollama sends none) is no sign of a cut reply.
        progress.finish = choice.finish_reason or "stop"
        return completion.usage

    def _record(self, usage: Any, seconds: float, progress: "_Progress", retries: int) -> None:
        prompt = getattr(usage, "prompt_tokens", None)
        new = getattr(usage, "completion_tokens", None)
        self.last_stats = RequestStats(prompt, new, seconds, progress.first_seconds, retries)
        if prompt is None or new is None:
            log.debug("the model server answered in %.2f s (no usage reported)", seconds)
            return
        self.prompt_tokens += prompt
        self.generated_tokens += new
        count_usage(prompt, new)
        first = f", first text after {progress.first_seconds:.2f} s" if progress.first_seconds is not None else ""
        again = f", {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""
        log.info("%s: %d reply tokens to %d prompt tokens in %.2f s%s%s", self.name, new, prompt, seconds,
                 first, again)

    # ------------------------------------------------------------ failures

    def _failure(self, exc: Exception, answered: bool) -> ModelServerError | None:
        """One clear sentence for what the server did wrong (the engine logs it and apologises); None for
        an exception that is not about the server. `answered`: the reply had begun (no retries then)."""
        openai = self._openai
        if isinstance(exc, _Incomplete):
            reason = "ended the reply before it was complete (no finish_reason)"
        elif isinstance(exc, openai.APITimeoutError):
            reason = f"did not answer within {self.config.timeout:g} s (generator.timeout)"
            if not answered and self.config.max_retries:
                reason += f", {self.config.max_retries + 1} tries"
        elif isinstance(exc, openai.APIConnectionError):
            reason = "closed the connection mid-reply" if answered else f"is not reachable ({_cause(exc)})"
        elif isinstance(exc, openai.APIStatusError):
            reason = f"answered HTTP {exc.status_code}: {_server_message(exc)}{_hint(exc.status_code)}"
        elif isinstance(exc, openai.APIError):
            reason = f"reported an error: {_server_message(exc)}"
        elif isinstance(exc, ValueError):  # json.JSONDecodeError: the client does not wrap it
            reason = f"sent a malformed {'event stream' if self.config.stream else 'reply'} (not JSON)"
        else:
            return None
        message = f"the model server at {self.url} {reason}"
        if self._key:
            message = message.replace(self._key, "***")
        return ModelServerError(message)

    def probe(self) -> bool:
        """Ask `GET <base_url>/models`, briefly; a server that is down is one warning, and the bot starts
        anyway (each message then gets an apology until the server answers)."""
        request = urllib.request.Request(self.config.base_url.rstrip("/") + "/models",
                                         headers={"Authorization": f"Bearer {self._key or PLACEHOLDER_KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT):
                return True
        except urllib.error.HTTPError as exc:  # it answers: reachable (some servers have no /models)
            if exc.code in (401, 403):
                log.warning("the model server at %s refused the API key (HTTP %d); check generator.api_key",
                            self.url, exc.code)
            return True
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            log.warning("the model server at %s is not reachable (%s); starting anyway, replies will be "
                        "apologies until it answers", self.url, reason)
            return False


class _Incomplete(Exception):
    """The server's reply ended without saying it was complete."""


class _Progress:
    """The reply so far: pieces passed on to `on_text` as they come, and how the reply ended."""

    def __init__(self, on_text: OnText | None) -> None:
        self.on_text = on_text
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.start = time.perf_counter()
        self.first_seconds: float | None = None
        self.answered = False
        """The server's response had begun: a failure now is mid-reply, and is not retried."""

    def add(self, piece: str) -> None:
        if not piece:
            return
        if self.first_seconds is None:
            self.first_seconds = time.perf_counter() - self.start
        self.pieces.append(piece)
        if self.on_text is not None:
            self.on_text(piece)


def estimated_tokens(text: str) -> int:
    """A chat message's tokens, estimated: 4 characters a token, plus the role markers."""
    return -(-len(text) // CHARS_PER_TOKEN) + MESSAGE_TOKENS


def _server_message(exc: "openai.APIError") -> str:
    """The server's own error message (`{"error": {"message": ...}}`), shortened."""
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    text = str(message or body or exc.message)
    return text if len(text) <= 200 else text[:200] + "…"


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check generator.api_key)"
    if status == 404:
        return " (check generator.model, and that generator.base_url ends with /v1)"
    return ""


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)


class OpenAIBackend(GeneratorBackend):
    """`generator.backend: openai`."""

    name = "openai"
    Config = OpenAIConfig

    @classmethod
    def create(cls, config: OpenAIConfig, settings: Settings) -> OpenAIGenerator:
        generator = OpenAIGenerator(config, history_tokens=settings.memory.max_tokens)
        generator.probe()
        return generator


@hookimpl
def chatforge_register_generators(register) -> None:
    register(OpenAIBackend)
