"""The `openai` generator backend against a loopback fake OpenAI server (tests/fake_openai.py).

The real `openai` client talks HTTP to 127.0.0.1; timeouts and retries are
kept small so every failure mode is reached in about a second.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from chatforge.config import GeneratorConfig, Settings
from chatforge.memory import Turn
from chatforge.openai_backend import ModelServerError, OpenAIBackend, OpenAIConfig, OpenAIGenerator
from chatforge.testing import make_bot

from fake_openai import MODEL, FakeOpenAI

SECRET = "sk-test-secret-4242"


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


def make_generator(base_url: str, settings: Settings | None = None, **keys) -> OpenAIGenerator:
    config = OpenAIConfig(**{"backend": "openai", "base_url": base_url, "model": MODEL,
                             "timeout": 2, "max_retries": 0, **keys})
    return OpenAIBackend.create(config, settings or Settings())


def run(generator: OpenAIGenerator, coroutine, limit: float = 20):
    """Run `coroutine` on a fresh loop, bounded, then close the generator's connections."""
    async def main():
        try:
            return await asyncio.wait_for(coroutine, limit)
        finally:
            await generator.close()
    return asyncio.run(main())


def failure(generator: OpenAIGenerator, coroutine) -> tuple[ModelServerError, float]:
    """The ModelServerError `coroutine` raises, and how long it took."""
    started = time.monotonic()
    with pytest.raises(ModelServerError) as caught:
        run(generator, coroutine)
    return caught.value, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------ config


def test_config_requires_url_and_model_and_checks_ranges():
    with pytest.raises(ValidationError) as missing:
        OpenAIConfig(backend="openai")
    assert {error["loc"][0] for error in missing.value.errors()} == {"base_url", "model"}
    for bad in ({"timeout": 0}, {"max_retries": -1}, {"max_concurrent": 0}, {"base_url": "127.0.0.1:8000/v1"},
                {"top_p": 1.5}, {"temperatur": 0.2}):
        with pytest.raises(ValidationError):
            OpenAIConfig(**{"base_url": "http://127.0.0.1:8000/v1", "model": "m", **bad})
    config = OpenAIConfig(backend="openai", base_url="http://127.0.0.1:8000/v1", model="m")
    assert config.system_prompt == GeneratorConfig().system_prompt
    assert config.api_key.get_secret_value() == "" and config.stream and config.max_retries == 2


def test_importing_the_backend_does_not_import_openai():
    """The module is imported whichever backend is chosen; the client costs a second to import."""
    code = "import sys, chatforge.openai_backend; print('openai' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# ------------------------------------------------------------ answers


def test_streamed_reply_feeds_on_text_piece_by_piece(server, caplog):
    generator = make_generator(server.base_url)
    pieces: list[str] = []
    with caplog.at_level(logging.INFO, logger="chatforge.openai_backend"):
        reply = run(generator, generator.reply([], "hello there", pieces.append))
    assert reply == "You said: hello there"
    assert len(pieces) > 1 and "".join(pieces) == reply
    (request,) = server.chat_requests()
    assert request.body["stream"] is True and request.body["stream_options"] == {"include_usage": True}
    assert request.body["model"] == MODEL
    stats = generator.last_stats
    assert stats.new_tokens == 4 and stats.prompt_tokens > 0 and 0 < stats.first_token_seconds <= stats.seconds
    assert generator.generated_tokens == 4 and generator.requests == 1
    (line,) = [record.getMessage() for record in caplog.records if record.name == "chatforge.openai_backend"]
    assert "4 reply tokens" in line and f"{stats.prompt_tokens} prompt tokens" in line and " s" in line


def test_unstreamed_reply(server):
    generator = make_generator(server.base_url, stream=False)
    pieces: list[str] = []
    assert run(generator, generator.reply([], "hi", pieces.append)) == "You said: hi"
    assert pieces == ["You said: hi"]  # a streaming consumer still gets the text, in one piece
    (request,) = server.chat_requests()
    assert not request.body.get("stream") and "stream_options" not in request.body
    assert generator.last_stats.new_tokens == 3


def test_complete_sends_the_instruction_alone(server):
    generator = make_generator(server.base_url)
    assert run(generator, generator.complete("Summarize: a b c", max_new_tokens=20)) == "You said: Summarize: a b c"
    (request,) = server.chat_requests()
    assert [m["role"] for m in request.messages] == ["system", "user"] and request.body["max_tokens"] == 20


def test_sampling_keys_are_sent_only_when_set(server):
    generator = make_generator(server.base_url, temperature=0.2, top_p=0.9, seed=7, stop=["\nUser:"],
                               max_new_tokens=50, extra_body={"top_k": 40})
    run(generator, generator.reply([], "hi"))
    plain = make_generator(server.base_url)
    run(plain, plain.reply([], "hi"))
    tuned, default = (request.body for request in server.chat_requests())
    assert (tuned["temperature"], tuned["top_p"], tuned["seed"], tuned["stop"], tuned["max_tokens"],
            tuned["top_k"]) == (0.2, 0.9, 7, ["\nUser:"], 50, 40)
    assert not {"temperature", "top_p", "seed", "stop", "top_k"} & default.keys()
    assert default["max_tokens"] == OpenAIConfig.model_fields["max_new_tokens"].default


def test_history_goes_as_chat_messages_trimmed_to_the_budget_newest_kept(server):
    history = []
    for index in range(10):
        history.append(Turn("user", f"question {index} " + "x" * 80))
        history.append(Turn("assistant", f"answer {index} " + "y" * 80))
    generator = make_generator(server.base_url, history_tokens=130, system_prompt="Be brief.")
    run(generator, generator.reply(history, "the last one"))
    messages = server.chat_requests()[0].messages
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[-1] == {"role": "user", "content": "the last one"}
    kept = messages[1:-1]
    # ~25 tokens a turn (90 characters / 4, plus 4 for the message): 130 keep 4 turns, a whole number of
    # exchanges, the newest, and the first of them a user turn.
    assert [m["content"].split(" ")[:2] for m in kept] == [
        ["question", "8"], ["answer", "8"], ["question", "9"], ["answer", "9"]]
    assert [m["role"] for m in kept] == ["user", "assistant"] * 2


def test_history_budget_defaults_to_memory_max_tokens(server):
    settings = Settings(memory={"max_tokens": 64})
    generator = make_generator(server.base_url, settings=settings)
    assert generator.history_tokens == 64
    history = [Turn("user", "q " + "x" * 400), Turn("assistant", "a short one"), Turn("user", "and then?"),
               Turn("assistant", "this.")]
    run(generator, generator.reply(history, "now"))
    messages = server.chat_requests()[0].messages
    assert [m["content"] for m in messages[1:]] == ["and then?", "this.", "now"]


def test_empty_system_prompt_sends_no_system_message(server):
    generator = make_generator(server.base_url, system_prompt="  ")
    run(generator, generator.reply([Turn("user", "a"), Turn("assistant", "b")], "c"))
    assert [m["role"] for m in server.chat_requests()[0].messages] == ["user", "assistant", "user"]


def test_a_reply_cut_by_max_tokens_is_marked(server):
    generator = make_generator(server.base_url)
    server.will("length")
    pieces: list[str] = []
    reply = run(generator, generator.reply([], "a long story", pieces.append))
    assert reply == "You said: a long story…" and "".join(pieces) == reply


def test_a_server_refusing_stream_options_is_asked_without(server):
    server.accepts_stream_options = False
    generator = make_generator(server.base_url)

    async def twice():
        return [await generator.reply([], "one"), await generator.reply([], "two")]

    assert run(generator, twice()) == ["You said: one", "You said: two"]
    first, retried, second = server.chat_requests()
    assert "stream_options" in first.body and "stream_options" not in retried.body
    assert "stream_options" not in second.body  # remembered


# ------------------------------------------------------------ retries


def test_429_waits_as_long_as_retry_after_says(server):
    server.retry_after = "1"
    server.will("429")
    generator = make_generator(server.base_url, max_retries=1)
    started = time.monotonic()
    assert run(generator, generator.reply([], "hi")) == "You said: hi"
    elapsed = time.monotonic() - started
    first, second = server.chat_requests()
    assert 1.0 <= second.at - first.at < 2.5 and elapsed < 3
    assert generator.last_stats.retries == 1


def test_500_then_success(server):
    server.will("500")
    generator = make_generator(server.base_url, max_retries=1)
    assert run(generator, generator.reply([], "hi")) == "You said: hi"
    assert [request.behaviour for request in server.chat_requests()] == ["500", "ok"]


def test_500_after_the_retries_names_the_server(server):
    server.will("500", "500")
    generator = make_generator(server.base_url, max_retries=1)
    error, _ = failure(generator, generator.reply([], "hi"))
    assert f"the model server at {server.base_url}" in str(error) and "HTTP 500" in str(error)
    assert "the model crashed" in str(error) and generator.failures == 1


def test_a_hanging_server_fails_after_timeout_times_tries(server):
    server.will("hang", "hang")
    generator = make_generator(server.base_url, timeout=0.4, max_retries=1)
    error, elapsed = failure(generator, generator.reply([], "hi"))
    assert "did not answer within 0.4 s" in str(error) and server.base_url in str(error)
    assert 0.8 <= elapsed < 0.8 + 0.5 + 1.5  # two tries of 0.4 s, one backoff of at most 0.5 s, slack
    server.wait_for(lambda: all(r.disconnected for r in server.chat_requests()), 3, "the client to hang up")


def test_a_stream_that_stops_mid_reply_times_out_once(server):
    server.will("hang_mid")
    generator = make_generator(server.base_url, timeout=0.4, max_retries=2)
    pieces: list[str] = []
    error, elapsed = failure(generator, generator.reply([], "hi", pieces.append))
    assert "did not answer within 0.4 s" in str(error) and pieces == ["You"]
    assert elapsed < 2 and len(server.chat_requests()) == 1  # a reply already begun is not retried


# ------------------------------------------------------------ broken streams


def test_malformed_sse_is_a_clear_error(server):
    server.will("malformed")
    generator = make_generator(server.base_url)
    error, _ = failure(generator, generator.reply([], "hi"))
    assert str(error) == f"the model server at {server.base_url} sent a malformed event stream (not JSON)"


def test_a_stream_ending_without_finish_reason_is_an_error(server):
    server.will("cut")
    generator = make_generator(server.base_url)
    error, _ = failure(generator, generator.reply([], "hi"))
    assert "ended the reply before it was complete" in str(error)


def test_a_connection_closed_mid_stream_is_an_error(server):
    server.will("abort")
    generator = make_generator(server.base_url, max_retries=2)
    error, _ = failure(generator, generator.reply([], "hi"))
    assert "closed the connection mid-reply" in str(error) and len(server.chat_requests()) == 1


def test_an_error_event_in_the_stream_is_reported(server):
    server.will("error_event")
    generator = make_generator(server.base_url)
    error, _ = failure(generator, generator.reply([], "hi"))
    assert "reported an error: the model is overloaded" in str(error)


# ------------------------------------------------------------ the event loop


def test_cancelling_a_reply_closes_its_request():
    with FakeOpenAI(chunk_delay=0.1) as server:
        generator = make_generator(server.base_url)
        pieces: list[str] = []

        async def cancel_mid_reply():
            task = asyncio.create_task(generator.reply([], "one two three four five six seven", pieces.append))
            while len(pieces) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(generator, cancel_mid_reply(), limit=5)
        (request,) = server.chat_requests()
        server.wait_for(lambda: request.disconnected, 3, "the fake to see the client hang up")
        assert len(pieces) < 8 and server.in_flight == 0


def test_a_failing_on_text_is_not_blamed_on_the_server():
    class AdapterBug(Exception):
        pass

    def on_text(piece: str) -> None:
        raise AdapterBug("the adapter broke")

    with FakeOpenAI(chunk_delay=0.1) as server:
        generator = make_generator(server.base_url)
        with pytest.raises(AdapterBug):
            run(generator, generator.reply([], "one two three four five", on_text))
        (request,) = server.chat_requests()
        server.wait_for(lambda: request.disconnected, 3, "the fake to see the client hang up")


def test_max_concurrent_bounds_requests_in_flight():
    with FakeOpenAI(chunk_delay=0.05) as server:
        generator = make_generator(server.base_url, max_concurrent=2)

        async def crowd():
            return await asyncio.gather(*(generator.reply([], f"message {n}") for n in range(6)))

        replies = run(generator, crowd())
        assert replies == [f"You said: message {n}" for n in range(6)]
        assert server.max_in_flight == 2


def test_a_slow_server_does_not_block_the_loop():
    with FakeOpenAI(chunk_delay=0.2) as server:
        generator = make_generator(server.base_url)
        ticks: list[float] = []

        async def reply_while_ticking():
            async def tick():
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.02)

            ticker = asyncio.create_task(tick())
            try:
                return await generator.reply([], "slowly now")
            finally:
                ticker.cancel()

        assert run(generator, reply_while_ticking()) == "You said: slowly now"
        assert len(ticks) > 20 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.15


# ------------------------------------------------------------ the key


def test_the_api_key_is_sent_but_never_logged_or_raised(server, caplog):
    server.will("ok", "500", "401")
    generator = make_generator(server.base_url, api_key=SECRET)
    errors: list[ModelServerError] = []

    async def three_requests():
        await generator.reply([], "hi")
        for _ in range(2):
            try:
                await generator.reply([], "hi")
            except ModelServerError as exc:
                errors.append(exc)

    with caplog.at_level(logging.DEBUG):  # the client's own debug lines too
        run(generator, three_requests())
    assert [r.headers["Authorization"] for r in server.chat_requests()] == [f"Bearer {SECRET}"] * 3
    assert len(errors) == 2 and "check generator.api_key" in str(errors[1])
    assert SECRET not in caplog.text and all(SECRET not in repr(e) and SECRET not in str(e) for e in errors)
    assert SECRET not in repr(generator.config) and SECRET not in generator.name


def test_no_key_sends_a_placeholder_not_the_environments(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    generator = make_generator(server.base_url)
    run(generator, generator.reply([], "hi"))
    (request,) = server.chat_requests()
    assert request.headers["Authorization"] == "Bearer no-key"


# ------------------------------------------------------------ start


def test_a_server_down_at_start_is_one_warning_naming_the_url(caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        generator = make_generator(url, api_key=SECRET, max_retries=1)
    assert time.monotonic() - started < 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and url in warnings[0] and "not reachable" in warnings[0]
    error, _ = failure(generator, generator.reply([], "hi"))
    assert str(error).startswith(f"the model server at {url} is not reachable")
    assert SECRET not in caplog.text and SECRET not in str(error)


def test_a_server_up_at_start_gives_no_warning(server, caplog):
    with caplog.at_level(logging.WARNING):
        generator = make_generator(server.base_url)
    asyncio.run(generator.close())
    assert not caplog.records
    assert [r.path for r in server.requests] == ["/v1/models"]
    assert generator.name == f"{MODEL} at {server.base_url}"


def test_the_url_shown_hides_userinfo():
    generator = OpenAIGenerator(OpenAIConfig(base_url="http://me:pw@127.0.0.1:9/v1", model="m"), 768)
    asyncio.run(generator.close())
    assert "pw" not in generator.name and "pw" not in generator.failure_source
    assert generator.failure_source == "the model server at 127.0.0.1:9"


# ------------------------------------------------------------ with the engine


def test_an_engine_answers_with_the_server_and_apologises_when_it_fails(server):
    generator = make_generator(server.base_url)
    bot = make_bot(generator=generator)
    try:
        assert bot.ask("hello") == "You said: hello"
        assert bot.ask("and again") == "You said: and again"
        roles = [m["role"] for m in server.chat_requests()[-1].messages]
        assert roles == ["system", "user", "assistant", "user"]  # the memory went along
        server.will("500")
        apology = bot.ask("are you there?")
        assert apology.startswith("Sorry, something went wrong while answering")
        assert bot.ask("back?") == "You said: back?"  # recovers as soon as the server does
    finally:
        bot.close()


def test_stats_show_the_model_servers_tokens_and_latency(server):
    generator = make_generator(server.base_url)
    bot = make_bot({"bot": {"admins": ["test:*"]}}, generator=generator)
    try:
        assert "Last reply:" not in bot.ask("/stats")  # nothing measured yet
        bot.ask("hello there")
        stats = bot.ask("/stats")
        last = generator.last_stats
        assert last.new_tokens and last.prompt_tokens
        assert (f"Last reply: {last.new_tokens} tokens to a {last.prompt_tokens}-token prompt "
                f"in {last.seconds:.2f} s; {generator.generated_tokens} tokens since start.") in stats
        assert f"Model: {MODEL} at" in stats
    finally:
        bot.close()
