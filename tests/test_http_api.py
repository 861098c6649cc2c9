"""The HTTP adapter's OpenAI-compatible API, through the official `openai` client on 127.0.0.1.

Each test starts the real adapter (aiohttp on a free loopback port) around a
bot from the test kit (its FakeGenerator answers "echo: TEXT", word by word
when streamed, and counts words as tokens) and talks to it as a user's
script would. `max_retries=0`: the client would otherwise retry 429 and 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

import httpx
import openai
import pytest

from chatforge.adapters.http import HttpAdapter, HttpConfig
from chatforge.hookspecs import hookimpl
from chatforge.message import Reply
from chatforge.generation import count_usage
from chatforge.testing import FakeGenerator, make_bot

KEY = "sk-test-0123456789"


def run(test: Any, timeout: float = 30) -> Any:
    """Run one async test body on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(test, timeout))


class PacedGenerator(FakeGenerator):
    """The fake generator, giving the loop a turn between words as a real model does between tokens."""

    async def reply(self, history, text, on_text=None):
        self.calls.append((list(history), text))
        answer = self.respond(history, text)
        count_usage(sum(len(turn.text.split()) for turn in history) + len(text.split()), len(answer.split()))
        for index, word in enumerate(answer.split(" ")):
            if on_text is not None:
                on_text(word if index == 0 else " " + word)
            await asyncio.sleep(0.01)
        return answer


@contextlib.asynccontextmanager
async def serving(config: dict[str, Any] | None = None, plugins: dict[str, Any] | None = None,
                  **http: Any) -> AsyncIterator[tuple[Any, HttpAdapter, str]]:
    """A bot behind the HTTP adapter: (test bot, adapter, base URL of the API). Stopped on exit."""
    bot = make_bot(config, plugins=plugins, generator=PacedGenerator())
    adapter = HttpAdapter(bot.engine, HttpConfig(enabled=True, port=0, **http))
    running = asyncio.create_task(adapter.run())
    try:
        await asyncio.wait_for(adapter.started.wait(), 10)
        yield bot, adapter, f"http://127.0.0.1:{adapter.port}/v1"
    finally:
        await adapter.stop()
        await asyncio.wait_for(running, 10)
        await bot.engine.close()


def client(base_url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)


async def streamed(api: openai.AsyncOpenAI, text: str, **extra: Any) -> tuple[list[str], Any]:
    """The content pieces of a streamed reply, and the last chunk."""
    stream = await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": text}],
                                               stream=True, **extra)
    pieces, last = [], None
    async for chunk in stream:
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, last


def test_a_streamed_reply_arrives_in_pieces_and_whole():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                pieces, last = await streamed(api, "tell me about the sea", stream_options={"include_usage": True})
        assert "".join(pieces) == "echo: tell me about the sea"
        assert len(pieces) > 1  # streamed word by word, not sent at the end
        # The generator's own counts (the fake counts words): 5 words asked, 6 answered.
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 6, 11)
    run(body())


def test_a_whole_reply_with_usage():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                completion = await api.chat.completions.create(
                    model="chatforge", messages=[{"role": "user", "content": "hello there"}])
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].message.content == "echo: hello there"
        assert completion.choices[0].finish_reason == "stop"
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 3)
        assert completion.model == "chatforge"
    run(body())


def test_a_skill_command_answers_through_the_api():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                pieces, _ = await streamed(api, "/sentiment I love it")
                whole = await api.chat.completions.create(
                    model="chatforge", messages=[{"role": "user", "content": "/sentiment I love it"}])
        assert "positive" in "".join(pieces).lower()
        assert "positive" in whole.choices[0].message.content.lower()
        assert whole.usage.model_extra.get("estimated") is True  # no generator ran: counted by characters
    run(body())


def test_memory_holds_across_two_calls_of_one_user_and_not_across_users():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                await api.chat.completions.create(model="chatforge", user="ann",
                                                  messages=[{"role": "user", "content": "my name is Ann"}])
                await api.chat.completions.create(model="chatforge", user="ann",
                                                  messages=[{"role": "user", "content": "what is my name?"}])
                await api.chat.completions.create(model="chatforge", user="bob",
                                                  messages=[{"role": "user", "content": "who am I?"}])
        calls = bot.generator.calls
        assert [turn.text for turn in calls[1][0]] == ["my name is Ann", "echo: my name is Ann"]
        assert calls[2][0] == []  # bob's conversation is his own
    run(body())


def test_the_conversation_header_separates_one_users_chats():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                for chat, text in (("a", "first chat"), ("b", "second chat"), ("a", "again")):
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": text}],
                                                      extra_headers={"X-Chatforge-Conversation": chat})
        assert [turn.text for turn in bot.generator.calls[2][0]] == ["first chat", "echo: first chat"]
    run(body())


def test_a_clients_earlier_messages_are_history_only_when_the_bot_has_none():
    async def body():
        sent = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "I have a cat"},
                {"role": "assistant", "content": "Nice cat!"},
                {"role": "user", "content": [{"type": "text", "text": "what pet do I have?"}]}]
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                await api.chat.completions.create(model="chatforge", messages=sent)
                # The client's record disagrees with what the bot remembers now: the bot's memory wins.
                await api.chat.completions.create(model="chatforge", messages=[
                    {"role": "user", "content": "I have a dog"}, {"role": "assistant", "content": "Woof"},
                    {"role": "user", "content": "and now?"}])
            key, = bot.memory.conversations("http")
            stored = bot.memory.recent(key, 20)
        first, second = bot.generator.calls
        assert [turn.text for turn in first[0]] == ["I have a cat", "Nice cat!"]
        assert first[1] == "what pet do I have?"
        assert [turn.text for turn in second[0]][:2] == ["I have a cat", "Nice cat!"]
        assert "I have a dog" not in [turn.text for turn in second[0]]
        # What the client says the bot said is kept as context, never as something to fine-tune on.
        assert stored[1].meta == {"source": "client"}
    run(body())


def test_a_wrong_or_missing_key_is_refused_with_401():
    async def body():
        async with serving(api_keys=[KEY]) as (bot, adapter, url):
            async with client(url, key="sk-wrong-key-000") as api:
                with pytest.raises(openai.AuthenticationError) as wrong:
                    await api.chat.completions.create(model="chatforge",
                                                      messages=[{"role": "user", "content": "hi"}])
                with pytest.raises(openai.AuthenticationError):
                    await api.models.list()
            async with httpx.AsyncClient() as http:
                missing = await http.post(f"{url}/chat/completions", json={"messages": []})
            async with client(url) as api:
                models = await api.models.list()
        assert wrong.value.status_code == 401
        assert wrong.value.body["code"] == "invalid_api_key"
        assert missing.status_code == 401 and "No API key" in missing.json()["error"]["message"]
        assert bot.generator.calls == []
        assert [model.id for model in models.data] == ["chatforge"]
    run(body())


def test_a_burst_beyond_the_rate_limit_gets_429_with_retry_after():
    async def body():
        config = {"limits": {"rate_per_minute": 6, "rate_burst": 2}}
        async with serving(config) as (bot, adapter, url):
            async with client(url) as api:
                for _ in range(2):
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "hi"}])
                with pytest.raises(openai.RateLimitError) as limited:
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "hi"}])
                # Told every time, not once a minute as a chat is: a script needs the status to back off.
                with pytest.raises(openai.RateLimitError):
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        retry_after = int(limited.value.response.headers["Retry-After"])
        assert 1 <= retry_after <= 10  # a token comes back every 10 s at 6 a minute
        assert limited.value.body["code"] == "rate_limit_exceeded"
        assert len(bot.generator.calls) == 2
    run(body())


class WaitsForRelease:
    """/wait answers `answer` once `release` is set (10 s at most): a reply held in flight."""

    def __init__(self, answer: str) -> None:
        self.answer, self.release = answer, asyncio.Event()

    @hookimpl
    def chatforge_register_commands(self, register):
        async def wait(ctx):
            await asyncio.wait_for(self.release.wait(), 10)
            return self.answer
        register("wait", wait, help="wait")


def test_busy_is_503_with_retry_after():
    async def body():
        slow = WaitsForRelease("done")
        release = slow.release

        async with serving({"limits": {"max_pending": 1}}, plugins={"slow": slow}) as (bot, adapter, url):
            async with client(url) as api:
                first = asyncio.create_task(api.chat.completions.create(
                    model="chatforge", user="a", messages=[{"role": "user", "content": "/wait"}]))
                for _ in range(100):  # until the first holds the one place (bounded: 5 s)
                    if bot.engine.queue.pending:
                        break
                    await asyncio.sleep(0.05)
                with pytest.raises(openai.InternalServerError) as busy:
                    await api.chat.completions.create(model="chatforge", user="b",
                                                      messages=[{"role": "user", "content": "hi"}])
                release.set()
                done = await first
        assert busy.value.status_code == 503 and busy.value.response.headers["Retry-After"] == "10"
        assert done.choices[0].message.content == "done"
    run(body())


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps([1, 2]).encode(), 400, "JSON object"),
    (json.dumps({"model": "chatforge", "messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"model": "chatforge", "messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400,
     "last message must be the user's"),
    (json.dumps({"model": "chatforge", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}).encode(), 400, "only text parts"),
    (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404,
     "this server has one, 'chatforge'"),
    (json.dumps({"model": "chatforge", "messages": [{"role": "user", "content": "  "}]}).encode(), 400, "empty"),
    (json.dumps({"model": "chatforge", "messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 400,
     "5,000 characters long"),
    (json.dumps({"model": "chatforge", "n": 2, "messages": [{"role": "user", "content": "hi"}]}).encode(), 400,
     "n: 1"),
    (json.dumps({"model": "chatforge", "user": "a\nb", "messages": [{"role": "user", "content": "hi"}]}).encode(),
     400, "user must be printable"),
    (json.dumps({"model": "chatforge", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode(), 413,
     "larger than 65,536 bytes"),
])
def test_bad_requests_get_openai_errors_naming_the_problem(body, status, says):
    async def check():
        async with serving(max_body_size=65536) as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                response = await http.post(f"{url}/chat/completions", content=body,
                                           headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert says in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        assert bot.generator.calls == []
    run(check())


def test_unknown_paths_and_methods_answer_in_the_error_format():
    async def body():
        async with serving() as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                missing = await http.get(f"{url}/completions")
                wrong = await http.get(f"{url}/chat/completions")
                escape = await http.get(url.removesuffix("/v1") + "/static/..%2fhttp.py")  # adapters/http.py exists
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
        assert escape.status_code == 404
    run(body())


def test_a_reply_changed_after_it_streamed_is_sent_as_a_replacement():
    class Shout:
        @hookimpl
        def chatforge_postprocess(self, message, reply, bot):
            return reply.text.upper()

    async def body():
        async with serving(plugins={"shout": Shout()}) as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                async with http.stream("POST", f"{url}/chat/completions", json={
                        "model": "chatforge", "stream": True,
                        "messages": [{"role": "user", "content": "quiet words"}]}) as response:
                    lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]
        assert "".join(event["choices"][0]["delta"].get("content", "") for event in events) == "echo: quiet words"
        assert [event["chatforge"] for event in events if "chatforge" in event] == [{"replace": "ECHO: QUIET WORDS"}]
    run(body())


def test_the_command_list_is_what_help_lists():
    async def body():
        async with serving() as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                listed = (await http.get(f"{url}/commands")).json()
        names = [command["name"] for command in listed["commands"]]
        assert listed["prefix"] == "/"
        assert {"help", "reset", "sentiment", "summarize", "translate"} <= set(names)
        assert "stats" not in names  # for admins only
        assert names == sorted(names)
    run(body())


def test_stopping_lets_a_reply_in_flight_finish_and_refuses_new_ones():
    async def body():
        slow = WaitsForRelease("finished")
        release = slow.release

        bot = make_bot(plugins={"slow": slow})
        adapter = HttpAdapter(bot.engine, HttpConfig(enabled=True, port=0))
        running = asyncio.create_task(adapter.run())
        await asyncio.wait_for(adapter.started.wait(), 10)
        url = f"http://127.0.0.1:{adapter.port}/v1"
        async with client(url) as api:
            first = asyncio.create_task(api.chat.completions.create(
                model="chatforge", messages=[{"role": "user", "content": "/wait"}]))
            for _ in range(100):
                if adapter.in_flight:
                    break
                await asyncio.sleep(0.05)
            await adapter.stop()
            with pytest.raises(openai.InternalServerError) as refused:
                await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "hi"}])
            release.set()
            finished = await first
        await asyncio.wait_for(running, 10)
        await bot.engine.close()
        assert finished.choices[0].message.content == "finished"
        assert refused.value.status_code == 503 and refused.value.body["code"] == "shutting_down"
    run(body())


def test_cors_allows_only_the_configured_origins():
    async def body():
        async with serving(cors_origins=["https://app.example"]) as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                preflight = await http.options(f"{url}/chat/completions", headers={
                    "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
                other = await http.options(f"{url}/chat/completions", headers={
                    "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
                streamed_response = await http.post(f"{url}/chat/completions", headers={"Origin": "https://app.example"},
                                                    json={"model": "chatforge", "stream": True,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
        assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers
        assert streamed_response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    run(body())


def test_the_page_is_served_with_a_strict_content_security_policy():
    async def body():
        async with serving() as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                page = await http.get(url.removesuffix("/v1") + "/")
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert "<html" in page.text.lower()
    run(body())


@pytest.mark.parametrize("section, error", [
    ({"listen": "0.0.0.0"}, "loopback address such as 127.0.0.1 unless api_keys is set"),
    ({"listen": "0.0.0.0", "api_keys": ""}, "loopback address"),
    ({"listen": "192.168.1.5"}, "anyone who can reach 192.168.1.5"),
    ({"api_keys": "short-key-12345"}, "at least 16 characters"),
])
def test_config_refuses_an_open_server_without_keys(section, error):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match=error):
        HttpConfig(enabled=True, **section)


def test_keys_come_from_one_comma_separated_variable():
    config = HttpConfig(api_keys=" first-key-0123456, second-key-0123456 ,", listen="0.0.0.0")
    assert [key.get_secret_value() for key in config.api_keys] == ["first-key-0123456", "second-key-0123456"]
    assert "first-key-0123456" not in repr(config)


# ---------------------------------------------------------------- from review: what a browser or a client could do


def test_another_sites_page_cannot_post_to_a_local_bot():
    async def body():
        async with serving() as (bot, adapter, url):
            root = url.removesuffix("/v1")
            async with httpx.AsyncClient() as http:
                # A form or fetch with text/plain needs no preflight: refused before anything is read.
                plain = await http.post(f"{url}/chat/completions", headers={"Content-Type": "text/plain"},
                                        content=json.dumps({"messages": [{"role": "user", "content": "/forget"}]}))
                foreign = await http.post(f"{url}/chat/completions", headers={"Origin": "https://evil.example"},
                                          json={"messages": [{"role": "user", "content": "/forget"}]})
                # A DNS name rebound to 127.0.0.1: the browser sends that name as the Host.
                rebound = await http.get(f"{url}/commands", headers={"Host": f"evil.example:{adapter.port}"})
                own_page = await http.post(f"{url}/chat/completions", headers={"Origin": root},
                                           json={"messages": [{"role": "user", "content": "hi"}]})
        assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "forbidden_origin"
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden_host"
        assert own_page.status_code == 200  # the chat page served here sends its own origin
        assert [text for _, text in bot.generator.calls] == ["hi"]
    run(body())


def test_a_reset_is_not_undone_by_a_client_that_resends_the_whole_chat():
    async def body():
        chat = [{"role": "user", "content": "my password is hunter2"}]
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                for text in ("/forget", "what do you know?"):
                    answer = await api.chat.completions.create(model="chatforge", messages=chat)
                    chat += [{"role": "assistant", "content": answer.choices[0].message.content},
                             {"role": "user", "content": text}]
                await api.chat.completions.create(model="chatforge", messages=chat)
        first, last = bot.generator.calls
        assert first[0] == []
        assert last[1] == "what do you know?"
        assert "my password is hunter2" not in [turn.text for turn in last[0]]
        assert last[0] == []
    run(body())


def test_two_keys_never_share_a_conversation():
    async def body():
        other = "sk-other-key-98765"
        async with serving(api_keys=[KEY, other]) as (bot, adapter, url):
            async with client(url) as first, client(url, other) as second:
                await first.chat.completions.create(model="chatforge", user="ann",
                                                    messages=[{"role": "user", "content": "secret of key one"}])
                await second.chat.completions.create(model="chatforge", user="ann",
                                                     messages=[{"role": "user", "content": "who said what?"}])
                listed = await second.chat.completions.create(model="chatforge", user="ann",
                                                              messages=[{"role": "user", "content": "/history"}])
        assert bot.generator.calls[1][0] == []
        assert "secret of key one" not in listed.choices[0].message.content
        keys = bot.memory.conversations("http")
        assert len(keys) == 2 and all(KEY not in key.encode() and other not in key.encode() for key in keys)
    run(body())


def test_open_webui_headers_name_the_user_and_the_chat():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                for chat, text in (("c1", "in chat one"), ("c2", "in chat two"), ("c1", "back in one")):
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": text}],
                                                      extra_headers={"X-OpenWebUI-User-Id": "u-42",
                                                                     "X-OpenWebUI-Chat-Id": chat})
        assert [turn.text for turn in bot.generator.calls[2][0]] == ["in chat one", "echo: in chat one"]
        users = {key.user for key in bot.memory.conversations("http")}
        assert users == {"local:u-42"}
    run(body())


def test_earlier_messages_are_trimmed_to_max_turns():
    async def body():
        sent = [{"role": "user", "content": f"line {index}"} if index % 2 == 0 else
                {"role": "assistant", "content": None if index == 1 else f"reply {index}"} for index in range(10)]
        sent.append({"role": "user", "content": "now"})
        async with serving({"memory": {"max_turns": 4}}) as (bot, adapter, url):
            async with client(url) as api:
                await api.chat.completions.create(model="chatforge", messages=sent)
        history, text = bot.generator.calls[0]
        assert text == "now"
        assert [turn.text for turn in history] == ["line 6", "reply 7", "line 8", "reply 9"]
    run(body())


def test_pictures_in_earlier_messages_are_skipped_and_null_fields_are_defaults():
    async def body():
        sent = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                              {"type": "text", "text": "look at this"}]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "and now?"}]
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                await api.chat.completions.create(model="chatforge", messages=sent, n=None, stream=None)
        assert [turn.text for turn in bot.generator.calls[0][0]] == ["look at this", "A cat."]
    run(body())


def test_usage_is_counted_per_request_when_replies_overlap():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                short, long = await asyncio.gather(
                    api.chat.completions.create(model="chatforge", user="a",
                                                messages=[{"role": "user", "content": "hi"}]),
                    api.chat.completions.create(model="chatforge", user="b",
                                                messages=[{"role": "user", "content": " ".join(["word"] * 30)}]))
        assert (short.usage.prompt_tokens, short.usage.completion_tokens) == (1, 2)
        assert (long.usage.prompt_tokens, long.usage.completion_tokens) == (30, 31)
    run(body())


class SlowCommands:
    """/wait SECONDS answers "waited" after that long."""

    @hookimpl
    def chatforge_register_commands(self, register):
        async def wait(ctx):
            await asyncio.sleep(float(ctx.args or 1))
            return "waited"
        register("wait", wait, help="wait")


def test_a_reply_past_request_timeout_is_a_504_or_an_error_event():
    async def body():
        async with serving(plugins={"slow": SlowCommands()}, request_timeout=0.5) as (bot, adapter, url):
            async with client(url) as api:
                with pytest.raises(openai.APIStatusError) as whole:
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "/wait 5"}])
                with pytest.raises(openai.APIError, match="No reply within 0.5 s"):
                    await streamed(api, "/wait 5")
            assert bot.engine.queue.pending == 0
        assert whole.value.status_code == 504
        assert whole.value.response.headers["x-should-retry"] == "false"
    run(body())


def test_a_client_that_leaves_mid_stream_still_gets_its_turn_remembered():
    async def body():
        async with serving() as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                words = " ".join(f"w{index}" for index in range(40))  # 41 words, 10 ms apart
                async with http.stream("POST", f"{url}/chat/completions", json={
                        "model": "chatforge", "stream": True,
                        "messages": [{"role": "user", "content": words}]}) as response:
                    async for line in response.aiter_lines():
                        if '"content": "echo:' in line:
                            break  # the first words arrived: hang up
            for _ in range(100):  # the reply goes on being made (bounded: 5 s)
                if bot.memory.conversations("http") and not bot.engine.queue.pending:
                    break
                await asyncio.sleep(0.05)
            key, = bot.memory.conversations("http")
            stored = [turn.text for turn in bot.memory.recent(key, 10)]
        assert stored == [words, f"echo: {words}"]
        assert bot.engine.queue.pending == 0
    run(body())


def test_stopping_answers_a_request_whose_body_was_still_arriving():
    async def body():
        bot = make_bot(generator=PacedGenerator())
        adapter = HttpAdapter(bot.engine, HttpConfig(enabled=True, port=0))
        running = asyncio.create_task(adapter.run())
        await asyncio.wait_for(adapter.started.wait(), 10)
        payload = json.dumps({"model": "chatforge", "messages": [{"role": "user", "content": "late"}]}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload[:10])
        await writer.drain()
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(adapter.stop())
        await asyncio.sleep(0.2)
        writer.write(payload[10:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await stopping
        await asyncio.wait_for(running, 10)
        await bot.engine.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"echo: late" in answer
    run(body())


def test_a_plugin_failing_under_strict_is_a_500_in_the_error_format():
    class Broken:
        @hookimpl
        def chatforge_register_commands(self, register):
            def boom(ctx):
                raise RuntimeError("kaputt")
            register("boom", boom, help="fail")

    async def body():
        async with serving(plugins={"broken": Broken()}) as (bot, adapter, url):
            async with client(url) as api:
                with pytest.raises(openai.InternalServerError) as failed:
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "/boom"}])
                with pytest.raises(openai.APIError, match="failed to answer"):
                    await streamed(api, "/boom")
        assert failed.value.body["code"] == "internal_error"
    run(body())


def test_cors_errors_carry_the_headers_a_page_needs():
    async def body():
        async with serving({"limits": {"rate_per_minute": 1, "rate_burst": 1}},
                           cors_origins=["https://app.example"]) as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                headers = {"Origin": "https://app.example"}
                message = {"model": "chatforge", "messages": [{"role": "user", "content": "hi"}]}
                await http.post(f"{url}/chat/completions", headers=headers, json=message)
                limited = await http.post(f"{url}/chat/completions", headers=headers, json=message)
                preflight = await http.options(f"{url}/chat/completions", headers={
                    **headers, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert limited.status_code == 429
        assert limited.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Retry-After" in limited.headers["Access-Control-Expose-Headers"]
        assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    run(body())


def test_too_long_ids_are_refused():
    async def body():
        async with serving() as (bot, adapter, url):
            async with client(url) as api:
                with pytest.raises(openai.BadRequestError, match="X-Chatforge-Conversation must be printable"):
                    await api.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "hi"}],
                                                      extra_headers={"X-Chatforge-Conversation": "c" * 201})
    run(body())


def test_an_idle_keep_alive_connection_is_closed_without_a_warning(caplog):
    async def body():
        async with serving(header_timeout=0.3) as (bot, adapter, url):
            async with httpx.AsyncClient() as http:
                first = await http.get(f"{url}/models")
                await asyncio.sleep(0.8)  # the client keeps the connection for its next request: normal, not an attack
                again = await http.get(f"{url}/models")
            reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHo")  # half a request, then nothing: worth a line
            await asyncio.sleep(0.8)
            writer.close()
        assert first.status_code == again.status_code == 200
        return [record.getMessage() for record in caplog.records if record.levelno >= 30]

    warnings = run(body())
    assert [line for line in warnings if "no complete request headers" in line] == [
        "closed a connection that sent no complete request headers within 0.3 s"]
