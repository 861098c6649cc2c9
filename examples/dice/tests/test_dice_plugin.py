"""chatforge-dice, tested with chatforge's pytest kit only (as a third party would)."""

import re

import pytest


@pytest.fixture
def chatforge_config():
    return {"plugins": {"dice": {"seed": 7}}}


def test_roll_defaults_to_one_six_sided_die(chatforge_bot):
    reply = chatforge_bot.ask("/roll")
    assert re.fullmatch(r"Tester rolled 1d6: [1-6]", reply)


def test_roll_notation_with_modifier(chatforge_bot):
    reply = chatforge_bot.ask("/roll 3d4+2")
    match = re.fullmatch(r"Tester rolled 3d4\+2: ([1-4]) \+ ([1-4]) \+ ([1-4]) \+ 2 = (\d+)", reply)
    assert match and int(match[4]) == sum(int(match[i]) for i in (1, 2, 3)) + 2


def test_same_seed_same_rolls(make_chatforge_bot):
    config = {"plugins": {"dice": {"seed": 42}}}
    first, second = make_chatforge_bot(config), make_chatforge_bot(config)
    assert [first.ask("/roll 5d20") for _ in range(3)] == [second.ask("/roll 5d20") for _ in range(3)]


def test_negative_modifier(chatforge_bot):
    assert re.fullmatch(r"Tester rolled 2d6-3: [1-6] \+ [1-6] - 3 = -?\d+", chatforge_bot.ask("/roll 2d6-3"))


def test_free_text_trigger(chatforge_bot):
    assert chatforge_bot.ask("roll 2d8 please").startswith("Tester rolled 2d8: ")
    assert chatforge_bot.ask("rolling stones are great") == "echo: rolling stones are great"


def test_bad_notation_and_limits_get_clear_replies(make_chatforge_bot):
    bot = make_chatforge_bot({"plugins": {"dice": {"max_dice": 10}}})
    assert bot.ask("/roll banana") == "I can't read 'banana'. Try 2d6, d20 or 3d8+2."
    assert bot.ask("/roll 11d6") == "I can roll between 1 and 10 dice at once."
    assert bot.ask("/roll 1d1") == "A die needs at least 2 sides."


def test_rolls_are_remembered_per_person_and_chat(make_chatforge_bot):
    bot = make_chatforge_bot({"plugins": {"dice": {"history": 2}}})
    assert bot.ask("/rolls", user="ann") == "You haven't rolled anything here yet. Try /roll 2d6."
    for notation in ("d4", "d6", "d8"):
        bot.ask(f"/roll {notation}", user="ann")
    bot.ask("/roll d20", user="bob")
    ann = bot.ask("/rolls", user="ann")
    assert re.fullmatch(r"Your last rolls: 1d6=\d, 1d8=\d", ann)
    assert bot.ask("/rolls", user="bob").startswith("Your last rolls: 1d20=")


def test_config_is_validated(make_chatforge_bot):
    from chatforge.config import ConfigError

    with pytest.raises(ConfigError, match="plugins.dice.default_sides"):
        make_chatforge_bot({"plugins": {"dice": {"default_sides": 1}}})


def test_listed_in_help(chatforge_bot):
    help_text = chatforge_bot.ask("/help")
    assert "/roll [NdS+M] - roll dice, e.g. 2d6+1" in help_text
    assert "/rolls - your last rolls in this chat" in help_text
