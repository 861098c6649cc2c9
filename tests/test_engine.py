"""The engine's routing order, error isolation and memory, with the fake generator."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest

from chatforge import Message, Reply, hookimpl
from chatforge.testing import FakeGenerator, make_bot


def run(coro):
    return asyncio.run(coro)


def plugin(**hooks) -> types.SimpleNamespace:
    """A plugin object from hook functions (each already marked with @hookimpl)."""
    return types.SimpleNamespace(**hooks)


def test_free_text_goes_to_the_generator_with_history():
    bot = make_bot()

    async def talk():
        first = await bot.ask_async("hello")
        second = await bot.ask_async("again")
        return first, second

    assert run(talk()) == ("echo: hello", "echo: again")
    history, text = bot.generator.calls[-1]
    assert text == "again"
    assert [(t.role, t.text) for t in history] == [("user", "hello"), ("assistant", "echo: hello")]


def test_empty_and_blank_messages_are_a_deliberate_silence():
    bot = make_bot()
    assert bot.ask("") is None
    assert bot.ask("   \n\t ") is None
    assert bot.generator.calls == []


def test_help_lists_every_command_with_its_help():
    @hookimpl
    def chatforge_register_commands(register):
        register("dice", lambda ctx: "4", help="roll a die", usage="[SIDES]")

    text = make_bot(plugins={"dicey": plugin(chatforge_register_commands=chatforge_register_commands)}).ask("/help")
    assert "/dice [SIDES] - roll a die" in text
    assert "/help - list the commands" in text
    assert "/history" in text and "/reset" in text


def test_history_and_reset_cover_only_this_conversation():
    bot = make_bot()

    async def talk():
        await bot.ask_async("I am Ann", user="ann")
        await bot.ask_async("I am Bob", user="bob")
        shown = await bot.ask_async("/history", user="ann")
        reset = await bot.ask_async("/reset", user="ann")
        after = await bot.ask_async("/history", user="ann")
        bob = await bot.ask_async("/history", user="bob")
        return shown, reset, after, bob

    shown, reset, after, bob = run(talk())
    assert "You: I am Ann" in shown and "I am Bob" not in shown
    assert "2 turns" in reset
    assert after == "I don't remember anything of this conversation yet."
    assert "You: I am Bob" in bob


def test_commands_are_not_remembered_as_conversation():
    bot = make_bot()
    bot.ask("/help")
    assert bot.ask("/history") == "I don't remember anything of this conversation yet."


def test_memory_scope_chat_shares_one_memory_between_users():
    bot = make_bot({"memory": {"scope": "chat"}}, chat="group", direct=False)

    async def talk():
        await bot.ask_async("from ann", user="ann")
        await bot.ask_async("from bob", user="bob")

    run(talk())
    history, _ = bot.generator.calls[-1]
    assert [t.text for t in history] == ["from ann", "echo: from ann"]


def test_memory_is_separate_per_thread_and_platform():
    bot = make_bot()

    async def talk():
        await bot.ask_async("in thread 1", thread="1")
        await bot.ask_async("in thread 2", thread="2")
        await bot.ask_async("on telegram", platform="telegram")

    run(talk())
    assert all(history == [] for history, _ in bot.generator.calls)


def test_max_turns_limits_the_history_given_to_the_model():
    bot = make_bot({"memory": {"max_turns": 3}})

    async def talk():
        for i in range(5):
            await bot.ask_async(f"line {i}")

    run(talk())
    assert all(len(history) <= 3 for history, _ in bot.generator.calls)
    history, _ = bot.generator.calls[-1]
    assert [t.text for t in history] == ["line 3", "echo: line 3"]  # the newest turns


def test_the_history_window_keeps_its_start_for_several_turns():
    """Once full, the window drops half of itself at once, so prompts share their start (and KV cache)."""
    bot = make_bot({"memory": {"max_turns": 8}})

    async def talk():
        for i in range(12):
            await bot.ask_async(f"line {i}")

    run(talk())
    histories = [history for history, _ in bot.generator.calls]
    assert [len(history) for history in histories] == [0, 2, 4, 6, 8, 6, 8, 6, 8, 6, 8, 6]
    firsts = [history[0].text for history in histories[1:]]
    assert firsts == ["line 0"] * 4 + ["line 2"] * 2 + ["line 4"] * 2 + ["line 6"] * 2 + ["line 8"]
    assert [t.text for t in bot.history()][-2:] == ["line 11", "echo: line 11"]  # /history is not windowed


def test_unknown_command_suggests_the_closest_one():
    assert make_bot().ask("/hepl") == "Unknown command /hepl. Did you mean /help? Send /help for the list."


def test_preprocess_can_rewrite_or_answer_before_anything_else():
    @hookimpl
    def chatforge_preprocess(message):
        if "secret" in message.text:
            return Reply("I won't talk about that.", remember=False)
        return message.replace(text=message.text.replace("colour", "color"))

    bot = make_bot(plugins={"filter": plugin(chatforge_preprocess=chatforge_preprocess)})
    assert bot.ask("the secret code") == "I won't talk about that."
    assert bot.ask("favourite colour") == "echo: favourite color"
    assert len(bot.generator.calls) == 1


def test_first_free_text_handler_wins_and_may_be_async():
    calls = []

    @hookimpl
    def chatforge_handle_text(message):
        calls.append("weather")
        if "weather" in message.text:
            async def answer():
                await asyncio.sleep(0)
                return "sunny"
            return answer()
        return None

    @hookimpl(trylast=True)
    def chatforge_handle_text_last(message):
        calls.append("fallback")
        return "claimed by the last one" if "claim" in message.text else None

    last = plugin(chatforge_handle_text=chatforge_handle_text_last)
    bot = make_bot(plugins={"weather": plugin(chatforge_handle_text=chatforge_handle_text), "last": last})
    assert bot.ask("what's the weather?") == "sunny"
    assert calls == ["weather"]
    assert bot.ask("please claim this") == "claimed by the last one"
    assert bot.ask("nobody wants this") == "echo: nobody wants this"
    assert bot.generator.calls[-1][1] == "nobody wants this"


def test_postprocess_rewrites_the_reply_before_it_is_remembered():
    @hookimpl
    def chatforge_postprocess(reply):
        return reply.text.upper()

    bot = make_bot(plugins={"shout": plugin(chatforge_postprocess=chatforge_postprocess)})
    assert bot.ask("hi") == "ECHO: HI"
    remembered = bot.engine.history(bot.message("x"))
    assert [t.text for t in remembered] == ["hi", "ECHO: HI"]
    assert bot.ask("/help").startswith("COMMANDS:")  # commands' replies pass through it too


def test_a_failing_command_is_an_apology_naming_the_plugin(caplog):
    @hookimpl
    def chatforge_register_commands(register):
        register("boom", lambda ctx: 1 / 0, help="explode")

    bot = make_bot(plugins={"bomb": plugin(chatforge_register_commands=chatforge_register_commands)}, strict=False)
    with caplog.at_level(logging.ERROR):
        text = bot.ask("/boom")
    assert text == "Sorry, something went wrong while answering (the bomb plugin failed). Please try again."
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "'bomb'" in errors[0] and "ZeroDivisionError" in errors[0]
    assert bot.ask("still there?") == "echo: still there?"


def test_a_failing_async_handler_is_an_apology(caplog):
    @hookimpl
    def chatforge_handle_text(message):
        async def fail():
            raise RuntimeError("backend down")
        return fail()

    bot = make_bot(plugins={"flaky": plugin(chatforge_handle_text=chatforge_handle_text)}, strict=False)
    with caplog.at_level(logging.ERROR):
        assert "the flaky plugin failed" in bot.ask("hi")
    assert any("backend down" in r.getMessage() and "'flaky'" in r.getMessage() for r in caplog.records)


def test_a_hook_that_raises_is_skipped_and_the_chat_goes_on(caplog):
    @hookimpl
    def chatforge_preprocess(message):
        raise ValueError("broken filter")

    bot = make_bot(plugins={"broken": plugin(chatforge_preprocess=chatforge_preprocess)}, strict=False)
    with caplog.at_level(logging.ERROR):
        assert bot.ask("hi") == "echo: hi"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "'broken'" in errors[0] and "broken filter" in errors[0]
    assert bot.engine.host.infos["broken"].errors


def test_generator_failure_is_an_apology_and_is_not_remembered(caplog):
    def explode(history, text):
        raise MemoryError("out of memory")

    bot = make_bot(generator=FakeGenerator(explode))
    with caplog.at_level(logging.ERROR):
        assert bot.ask("hi") == "Sorry, something went wrong while answering (the generator failed). Please try again."
    assert any("generator failed" in r.getMessage() for r in caplog.records)
    assert bot.memory.recent(bot.engine.conversation(bot.message("x")), 10) == []


def test_memory_failure_still_delivers_the_reply(caplog):
    bot = make_bot()

    def full_disk(key, *turns):
        raise OSError(28, "No space left on device")

    bot.memory.add = full_disk
    with caplog.at_level(logging.ERROR):
        assert bot.ask("hi") == "echo: hi"
    assert any("No space left" in r.getMessage() for r in caplog.records)


def test_streaming_delivers_the_reply_piece_by_piece():
    bot = make_bot()
    pieces: list[str] = []
    reply = run(bot.engine.handle(Message("one two three"), on_text=pieces.append))
    assert pieces == ["echo:", " one", " two", " three"]
    assert "".join(pieces) == reply.text


def test_startup_and_shutdown_hooks_see_the_bot_and_their_config():
    from chatforge import PluginConfig

    seen = {}

    class Config(PluginConfig):
        greeting: str = "hi"

    @hookimpl
    def chatforge_config_model():
        return Config

    @hookimpl
    def chatforge_startup(bot, config):
        seen["startup"] = (bot.name, config.greeting)

    @hookimpl
    def chatforge_shutdown(bot):
        seen["shutdown"] = True

    bot = make_bot({"plugins": {"greeter": {"greeting": "hello"}}},
                   plugins={"greeter": plugin(chatforge_config_model=chatforge_config_model,
                                              chatforge_startup=chatforge_startup,
                                              chatforge_shutdown=chatforge_shutdown)})
    assert seen == {"startup": ("chatforge", "hello")}
    run(bot.engine.close())
    assert seen["shutdown"] is True


def test_command_handler_gets_args_message_and_config():
    from chatforge import PluginConfig

    class Config(PluginConfig):
        sides: int = 6

    @hookimpl
    def chatforge_config_model():
        return Config

    @hookimpl
    def chatforge_register_commands(register, config):
        async def roll(ctx):
            return f"{ctx.message.user} rolled {ctx.args or 'nothing'} on d{ctx.config.sides} (d{config.sides})"
        register("throw", roll, help="roll dice", usage="N")

    bot = make_bot({"plugins": {"dicey": {"sides": 20}}},
                   plugins={"dicey": plugin(chatforge_config_model=chatforge_config_model,
                                           chatforge_register_commands=chatforge_register_commands)})
    assert bot.ask("/throw 2", user="ann") == "ann rolled 2 on d20 (d20)"
    assert bot.ask("/THROW@chatforge_bot", user="bob") == "bob rolled nothing on d20 (d20)"


def test_a_command_decides_whether_its_reply_is_remembered():
    @hookimpl
    def chatforge_register_commands(register):
        async def note(ctx):
            return Reply(f"noted: {ctx.args}", remember=True)
        register("note", note, help="remember a note")
        register("plain", lambda ctx: "not remembered", help="answer plainly")

    bot = make_bot(plugins={"notes": plugin(chatforge_register_commands=chatforge_register_commands)})
    bot.ask("/note buy milk")
    bot.ask("/plain")
    assert [t.text for t in bot.engine.history(bot.message("x"))] == ["/note buy milk", "noted: buy milk"]
