"""Turning a conversation into the token ids a model is given.

Models with a chat template (instruction-tuned ones such as SmolLM2) get it.
Plain language models such as GPT-2 get a transcript:

    <system prompt>

    User: hello
    Bot: hi, how can I help?
    User: <new message>
    Bot:

with "\nUser:" and "\nBot:" as stop sequences, so the model never writes the
user's next line (also with the full-width colon, "\nUser：", which a model
continuing Chinese text may write). Newlines inside a message are flattened in
the transcript, so a message cannot fake a role line.

Text never becomes control tokens: a message, a stored turn or a skill's
instruction that spells `<|im_start|>` or `<|endoftext|>` is encoded as those
characters, so only the chat template's own markers are special ids (else a
user could open a system turn, kept in every later prompt of the conversation,
or end GPT-2's text). The transcript is encoded with special-token parsing off;
the chat template with transformers' `sanitize_control_tokens`, which encodes
control-token spellings found in the messages as plain text.

Chat-template prompts open with a short greeting exchange (OPENING) when the
user writes English, or nothing surer: small instruction models drift into the
language of the topic otherwise (SmolLM2-135M, sampling at temperature 0.2,
answered "What is the capital of France?" in French in 9 of 10 seeded runs
without it, in English in 10 of 10 with it). It is
left out when the user's latest message that langid is sure of is in another
language, since an English example pulls the model into English there, and
when the latest message is in Chinese, Japanese or Korean script, which langid
is unsure of when it is one character ("嗨！", "嗯").

History is cut, oldest turns first, to fit the context window and the history
token budget (tokens, not characters: a Chinese character may be one token or
three), in steps of `trim_turns` turns counted from the start of the history
given (halved while even the newest step is too long). Cutting in
steps keeps the prompt's start the same for several turns, so the
conversation's cached keys and values stay usable (core/local/kv_cache.py); cutting
one exchange per turn would change the start, and recompute the whole prompt,
on every turn.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import regex

from ..memory import Turn, trim_step, window_start  # noqa: F401 - recall window, importable from here as before
from .model_loading import ModelLoadError

USER_LABEL = "User"
BOT_LABEL = "Bot"
TRANSCRIPT_STOPS = [f"\n{USER_LABEL}:", f"\n{BOT_LABEL}:"]
FULL_WIDTH_STOPS = [f"\n{USER_LABEL}：", f"\n{BOT_LABEL}："]
"""The role lines again with a full-width colon, as a model writing Chinese may put them: a reply ends there too."""
OPENING = [Turn("user", "Hi!"), Turn("assistant", "Hello! How can I help you today?")]
"""The example exchange that keeps a chat model in English when the user writes English."""


@functools.lru_cache(maxsize=1024)
def _sure_language(text: str) -> str | None:
    """The ISO 639-3 code of `text`'s language when langid is sure of it, else None ("ok", "Hi")."""
    from ..language import detect_language

    guess = detect_language(text)
    return guess.code if guess is not None and guess.sure else None


_CJK_SCRIPT = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")


def writes_english(turns: Sequence[Turn], text: str) -> bool:
    """Whether the user's latest message of a language langid is sure of is English (True when none is); a
    message langid is unsure of but written in Chinese, Japanese or Korean script is surely not English."""
    for message in [text, *(turn.text for turn in reversed(turns) if turn.role == "user")]:
        language = _sure_language(message)
        if language is not None:
            return language == "eng"
        if _CJK_SCRIPT.search(message):
            return False
    return True


@dataclass
class Prompt:
    input_ids: list[int]
    turns_used: int
    """How many history turns fit."""


class PromptBuilder:
    def __init__(
        self,
        tokenizer: Any,
        system_prompt: str,
        context_window: int,
        max_new_tokens: int,
        history_tokens: int,
        trim_turns: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if self.uses_chat_template:
            _require_sanitizing(tokenizer)
            _sure_language("Hello, how are you?")  # load langid (~1.5 s) now rather than on the first message
        self.prompt_budget = max(16, context_window - max_new_tokens)
        self.history_tokens = history_tokens
        self.trim_turns = max(1, trim_turns)

    @property
    def stop_sequences(self) -> list[str]:
        """The role markers the transcript itself writes (none with a chat template: EOS ends a reply)."""
        return [] if self.uses_chat_template else list(TRANSCRIPT_STOPS)

    @property
    def reply_stops(self) -> list[str]:
        """Where a reply ends: the transcript's role markers, and the same with a full-width colon."""
        return [] if self.uses_chat_template else TRANSCRIPT_STOPS + FULL_WIDTH_STOPS

    def build(self, history: Sequence[Turn], text: str) -> Prompt:
        """The prompt for answering `text` after `history`, newest turns kept."""
        bare = self._render([], text)
        if len(bare) > self.prompt_budget:
            return Prompt(self._render([], self._clip(text, len(bare) - self.prompt_budget)), 0)
        history = list(history)
        for start in self._starts(len(history)):
            ids = self._render(history[start:], text)
            if len(ids) <= self.prompt_budget and len(ids) - len(bare) <= self.history_tokens:
                return Prompt(ids, len(history) - start)
        return Prompt(bare, 0)

    def _starts(self, turns: int):
        """Where the kept history may start, in the order tried: every `trim_turns`-th turn first (a start
        that stays put while the conversation grows), then on ever finer steps when those leave too much."""
        step, tried = self.trim_turns, set()
        while True:
            for start in range(0, turns, step):
                if start not in tried:
                    tried.add(start)
                    yield start
            if step == 1:
                return
            step = max(1, step // 2)

    def instruction(self, text: str) -> list[int]:
        """A one-off prompt with no history (skills use it: "summarize this: ...")."""
        return self.build([], text).input_ids

    def _clip(self, text: str, excess_tokens: int) -> str:
        """Drop the start of an over-long message so the prompt fits, keeping its end. The cut is in token ids,
        so it can fall inside a character (byte-level BPE splits many Chinese characters and emoji); the bytes
        left of that character decode to U+FFFD and go too."""
        return self.tokenizer.decode(_text_ids(self.tokenizer, text)[excess_tokens + 8:]).lstrip("\ufffd")

    def _render(self, turns: Sequence[Turn], text: str) -> list[int]:
        if self.uses_chat_template:
            return self._render_chat(turns, text)
        lines = [self.system_prompt.strip(), ""] if self.system_prompt.strip() else []
        for turn in turns:
            lines.append(f"{USER_LABEL if turn.role == 'user' else BOT_LABEL}: {_one_line(turn.text)}")
        lines.append(f"{USER_LABEL}: {_one_line(text)}")
        lines.append(f"{BOT_LABEL}:")
        return _text_ids(self.tokenizer, "\n".join(lines))  # a transcript has no markers: all of it is text

    def _render_chat(self, turns: Sequence[Turn], text: str) -> list[int]:
        opening = OPENING if writes_english(turns, text) else []
        messages = [{"role": turn.role, "content": turn.text} for turn in [*opening, *turns]]
        messages.append({"role": "user", "content": text})
        if self.system_prompt.strip():
            messages.insert(0, {"role": "system", "content": self.system_prompt.strip()})
        try:
            return self._apply_template(messages)
        except Exception:  # noqa: BLE001 - some templates refuse a system role
            if messages[0]["role"] != "system":
                raise
            system = messages.pop(0)["content"]
            messages[0] = {"role": messages[0]["role"], "content": f"{system}\n\n{messages[0]['content']}"}
            return self._apply_template(messages)

    def _apply_template(self, messages: list[dict[str, str]]) -> list[int]:
        """The template's markers as special ids, the messages' text (control-token spellings too) as text."""
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True
        )
        return list(encoded["input_ids"])


def _require_sanitizing(tokenizer: Any) -> None:
    """Refuse a chat template that would encode user text's control-token spellings as control tokens: older
    transformers pass the unknown `sanitize_control_tokens` on to the template and ignore it."""
    if "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters:
        raise ModelLoadError(
            f"this transformers ({type(tokenizer).__name__}) cannot keep control tokens such as <|im_start|> in "
            "users' messages as plain text (apply_chat_template has no sanitize_control_tokens); upgrade it: "
            "pip install -U 'transformers>=5.24,<6'"
        )


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """`text`'s token ids with special-token spellings ("<|endoftext|>") encoded as the characters they are."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())
