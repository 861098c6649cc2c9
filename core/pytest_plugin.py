"""pytest fixtures for testing chatforge plugins; pytest loads them automatically once chatforge is installed.

    def test_roll(chatforge_bot):
        assert chatforge_bot.ask("/roll 1") == "You rolled 1."

The bot has every installed plugin (yours too, through its entry point), a
deterministic fake generator (it answers "echo: <text>") and memory that
lives in the test. Override `chatforge_config` in a conftest.py to configure
it, or build bots with other settings in a test with `make_chatforge_bot`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from .testing import FakeGenerator, TestBot, make_bot


@pytest.fixture
def chatforge_config() -> dict[str, Any]:
    """The config the `chatforge_bot` fixture uses, as a dict of YAML sections (override it)."""
    return {}


@pytest.fixture
def chatforge_plugins() -> dict[str, Any]:
    """Plugins to register besides the installed ones: name -> module or object (override it)."""
    return {}


@pytest.fixture
def fake_generator() -> FakeGenerator:
    """The language model stand-in: `fake_generator.respond = lambda history, text: "..."` scripts it."""
    return FakeGenerator()


@pytest.fixture
def make_chatforge_bot(chatforge_plugins, fake_generator) -> Iterator[Callable[..., TestBot]]:
    """A factory: `make_chatforge_bot({"plugins": {"dice": {"sides": 20}}})`; each bot is closed after the test."""
    bots: list[TestBot] = []

    def make(config: dict[str, Any] | None = None, **options: Any) -> TestBot:
        options.setdefault("plugins", chatforge_plugins)
        options.setdefault("generator", fake_generator)
        bot = make_bot(config, **options)
        bots.append(bot)
        return bot

    yield make
    for bot in bots:
        bot.close()


@pytest.fixture
def chatforge_bot(make_chatforge_bot, chatforge_config) -> TestBot:
    """A bot with `chatforge_config`, strict (a plugin failure fails the test)."""
    return make_chatforge_bot(chatforge_config)
