"""Translate: text from one language into another, offline.

    /translate es Hello, how are you?    ->  Hola, cómo eres?
    /translate spa>eng Hola              ->  Hello
    translate to Spanish: good morning   ->  buenos días

Languages are ISO 639-1 or 639-3 codes (`es`, `spa`) or English names
(`Spanish`). Without a source language, `chatforge.language` detects it among
all languages: a language no pair covers is named, with the pairs there are.
When the guess is unsure (short texts), the likeliest pair into the target is
tried, and a result that is mostly the input (words the pair does not know) is
refused rather than shown as a translation.

Each pair has its own backend. `models:` names a MarianMT model (a folder, or
a Hub id the cache has) per pair, e.g. `{zho-eng: models/opus-mt-zh-en}`,
whatever the backend; `backend` says what covers the other pairs: `apertium`
(default; rule-based, runs the `apertium` program, whose pairs are Debian
packages such as `apertium-eng-spa`) or `transformers` (the Hub id from the
`model` template). A refusal for a missing pair says how to add it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import logging
import subprocess
from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt, field_validator

from chatforge import (CommandContext, Lazy, Message, PluginConfig, SkillError, Trigger, check_length,
                       hookimpl, match_trigger, require)
from chatforge.language import Detection, iso639_3, language_name, rank_languages

log = logging.getLogger("chatforge.plugins.translate")

USAGE = "[SRC>]TGT TEXT"
APERTIUM_INSTALL = "apt-get install apertium apertium-eng-spa"

Pair = tuple[str, str]
"""(source, target), both ISO 639-3 codes."""

Route = tuple[Literal["apertium", "transformers"], str]
"""What translates a pair: ("apertium", mode) or ("transformers", model id or folder)."""


# ---------------------------------------------------------------- languages

def iso639_1(code: str) -> str:
    """The two-letter code where there is one (Marian model names and langid use them), else `code`."""
    return require("iso639", "pip install iso639-lang").Lang(code).pt1 or code


def parse_pair(text: str) -> Pair:
    """'eng-spa' or 'en-es' -> ('eng', 'spa'); ValueError for anything else."""
    sides = text.split("-")
    codes = [iso639_3(side) for side in sides]
    if len(sides) != 2 or None in codes:
        raise ValueError(f"{text!r} is not a language pair like 'eng-spa' (ISO 639 codes)")
    return codes[0], codes[1]


def show_pair(pair: Pair) -> str:
    return f"{pair[0]}→{pair[1]}"


# ---------------------------------------------------------------- config

class TranslateConfig(PluginConfig):
    backend: Literal["apertium", "transformers"] = "apertium"
    timeout: PositiveFloat = 30
    """Seconds Apertium may take for one text."""
    model: str = "Helsinki-NLP/opus-mt-{src}-{tgt}"
    """For transformers: the model id for a pair not in `models`, from ISO 639-1 codes; "" for none."""
    models: dict[str, str] = {}
    """For transformers: pair -> model id or folder, e.g. {"eng-spa": "/models/opus-mt-en-es"}."""
    max_new_tokens: PositiveInt = 512
    max_chars: PositiveInt = 5000
    default_target: str = "eng"
    """The target language for a trigger without a (?P<lang>...) group."""
    triggers: list[Trigger] = [
        r"translate\s+(?:from\s+(?P<source>[\w-]+)\s+)?(?:to|into)\s+(?P<lang>[\w-]+)(?:\s*[:,]\s*|\s+)(?P<text>.+)",
        r"how\s+(?:do|would|can)\s+(?:you|I)\s+say\s+(?P<text>.+?)\s+in\s+(?P<lang>[\w-]+)\s*\??\s*$",
    ]

    @field_validator("model")
    @classmethod
    def _template_uses_src_and_tgt_only(cls, template: str) -> str:
        try:
            template.format(src="en", tgt="es")
        except (KeyError, IndexError, ValueError):
            raise ValueError("the model template may only use {src} and {tgt}") from None
        return template

    @field_validator("models")
    @classmethod
    def _keys_are_pairs(cls, models: dict[str, str]) -> dict[str, str]:
        return {"-".join(parse_pair(key)): os.path.expanduser(source) for key, source in models.items()}

    @field_validator("default_target")
    @classmethod
    def _is_a_language(cls, language: str) -> str:
        code = iso639_3(language)
        if code is None:
            raise ValueError(f"{language!r} is not an ISO 639 language code or name")
        return code


# ---------------------------------------------------------------- backends

def parse_apertium_modes(listing: str) -> dict[Pair, str]:
    """`apertium -l` output -> {(source, target): mode to run}.

    Mode names mix 2- and 3-letter codes (`en-gl`, `eng-spa`) and add variants
    (`spa-eng_US`); the plain mode wins over a variant of the same pair.
    """
    pairs: dict[Pair, str] = {}
    for mode in sorted(listing.split(), key=lambda mode: ("_" in mode, mode)):
        sides = mode.split("-")
        if len(sides) != 2:
            continue  # not a translation mode (e.g. a tagger)
        source, target = (iso639_3(side.split("_")[0]) for side in sides)
        if source and target:
            pairs.setdefault((source, target), mode)
    return pairs


def missing_apertium() -> SkillError:
    return SkillError(f"Translation needs the apertium program, which is not installed: {APERTIUM_INSTALL} "
                      f"(or set plugins.translate.backend: transformers).")


class ApertiumBackend:
    """The installed Apertium pairs; each translation is a short-lived `apertium` process."""

    def __init__(self) -> None:
        try:
            listing = subprocess.run(["apertium", "-l"], capture_output=True, text=True, timeout=30, check=True)
        except FileNotFoundError:
            raise missing_apertium() from None
        self.pairs = parse_apertium_modes(listing.stdout)

    async def translate(self, text: str, mode: str, timeout: float) -> tuple[str, list[str]]:
        """The translation and the words the pair did not know (Apertium's `*` marks, removed)."""
        try:
            process = await asyncio.create_subprocess_exec(
                "apertium", mode,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise missing_apertium() from None
        try:
            output, errors = await asyncio.wait_for(process.communicate(text.encode() + b"\n"), timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            raise SkillError(f"Apertium took longer than {timeout:g} s; please send a shorter text.") from None
        if process.returncode != 0:
            problem = errors.decode(errors="replace").strip().splitlines()
            raise SkillError(f"Apertium failed on {mode}: {problem[0] if problem else 'no message'}")
        # Apertium keeps the blank of every word it moves or drops, leaving doubled spaces.
        return unmark(re.sub(r"[ \t]{2,}", " ", output.decode(errors="replace")).strip(), text)


def unmark(marked: str, text: str) -> tuple[str, list[str]]:
    """Apertium's output without the `*` it puts before each unknown word, and those words.

    An unknown word is copied from the input, so a `*` before a word the input
    lacks is the user's own (`*really*` -> `*realmente*`) and stays.
    """
    given = set(re.findall(r"\w+", text))
    unknown: list[str] = []

    def drop_mark(match: re.Match[str]) -> str:
        if match.group(1) not in given:
            return match.group(0)
        unknown.append(match.group(1))
        return match.group(1)

    return re.sub(r"\*(\w+)", drop_mark, marked), unknown


def words(text: str) -> list[str]:
    """The words of `text`: runs of letters (numbers and punctuation are the same in every language)."""
    return re.findall(r"[^\W\d_]+", text)


def untranslated(text: str, translation: str, unknown: list[str]) -> bool:
    """Whether `translation` is no translation of `text`: the same words, or more than half of them unknown."""
    same = [word.casefold() for word in words(translation)] == [word.casefold() for word in words(text)]
    return same or 2 * len(unknown) > len(words(translation))


PREFERRED_VARIETY = {"zho": ["cmn_Hans", "cmn"]}
"""Which variety a multi-target model writes for a macrolanguage: Simplified Mandarin for Chinese."""


class ModelUnavailable(Exception):
    """A transformers model that cannot be loaded; `translate` tells the user what to set instead."""


def load_marian(source: str) -> tuple[Any, Any]:
    """Tokenizer and model from a Hub id or a local folder (the one place that reads them)."""
    transformers = require("transformers", "pip install transformers")
    require("sentencepiece", "pip install sentencepiece")  # Marian tokenizers are SentencePiece models
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source)
    model.eval()
    return tokenizer, model


class MarianBackend:
    """One MarianMT model: one language pair."""

    def __init__(self, source: str) -> None:
        try:
            self.tokenizer, self.model = load_marian(source)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(exc.__class__.__name__) from None

    def target_token(self, target: str) -> str:
        """The `>>code<<` a multi-target model (opus-mt-en-zh: >>cmn_Hans<<, >>cmn_Hant<<, >>yue<<...) needs
        at the start of each sentence to write `target`; "" for a model with one target language."""
        codes = list(getattr(self.tokenizer, "supported_language_codes", []) or [])
        if not codes:
            return ""
        names = [target, iso639_1(target), *PREFERRED_VARIETY.get(target, [])]
        for name in dict.fromkeys(names):
            for code in codes:
                if code[2:-2] == name or code[2:-2].startswith(f"{name}_"):
                    return code
        raise SkillError(f"needs a target-language token, and it has none for {language_name(target)} "
                         f"(it has {', '.join(codes[:8])}{' and more' if len(codes) > 8 else ''}).")

    def translate(self, text: str, max_new_tokens: int, target: str = "") -> str:
        """Line by line, as the models are trained on sentences; blank lines are kept."""
        import torch

        prefix = self.target_token(target) if target else ""
        lines = text.split("\n")
        wanted = [f"{prefix} {line}" if prefix else line for line in lines if line.strip()]
        batch = self.tokenizer(wanted, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            output = self.model.generate(**batch, max_new_tokens=max_new_tokens)
        translated = iter(self.tokenizer.batch_decode(output, skip_special_tokens=True))
        return "\n".join(next(translated).strip() if line.strip() else line for line in lines).strip()


@functools.cache
def backend_for(kind: str, model: str = "") -> Lazy[Any]:
    """One lazily loaded backend per (kind, model), shared by every chat."""
    if kind == "transformers":
        return Lazy(lambda: MarianBackend(model))
    return Lazy(ApertiumBackend)


# ---------------------------------------------------------------- translating

async def available_pairs(config: TranslateConfig) -> dict[Pair, Route]:
    """Pair -> its route: the configured `models` first, then Apertium's installed pairs (backend apertium).

    Without the apertium program the configured models still serve their pairs;
    only a pair none of them covers gets the install hint.
    """
    routes: dict[Pair, Route] = {}
    if config.backend == "apertium":
        try:
            modes = (await backend_for("apertium").get()).pairs
        except SkillError as missing:
            if not config.models:
                raise
            log.warning("translate: %s Serving only the pairs in plugins.translate.models.", missing)
            modes = {}
        routes.update({pair: ("apertium", mode) for pair, mode in modes.items()})
    routes.update({parse_pair(key): ("transformers", source) for key, source in config.models.items()})
    return routes


def pairs_list(pairs: dict[Pair, Route], config: TranslateConfig) -> str:
    if pairs:
        return "Available pairs: " + ", ".join(show_pair(pair) for pair in sorted(pairs)) + "."
    if config.backend == "transformers":
        return 'No pairs are set up: add folders to plugins.translate.models, e.g. {"eng-spa": "/models/opus-mt-en-spa"}.'
    return f"No Apertium pairs are installed: {APERTIUM_INSTALL}."


def how_to_add(pair: Pair, config: TranslateConfig) -> str:
    """The commands that add `pair`: download its MarianMT model once, name the folder in `models`."""
    model = (config.model or "Helsinki-NLP/opus-mt-{src}-{tgt}").format(src=iso639_1(pair[0]), tgt=iso639_1(pair[1]))
    folder = f"models/{model.rstrip('/').rsplit('/', 1)[-1]}"
    return (f"To add {language_name(pair[0])}→{language_name(pair[1])}: hf download {model} --local-dir {folder}, "
            f"then set plugins.translate.models: {{{'-'.join(pair)}: {folder}}}.")


def uses_hub_models(config: TranslateConfig) -> bool:
    """Whether pairs beyond `available_pairs` may work: transformers models named by the `model` template."""
    return config.backend == "transformers" and bool(config.model)


def hub_route(pair: Pair, config: TranslateConfig) -> Route | None:
    if not uses_hub_models(config):
        return None
    return "transformers", config.model.format(src=iso639_1(pair[0]), tgt=iso639_1(pair[1]))


def listing(unknown: list[str], most: int = 5) -> str:
    """'Guten, Morgen' or 'ist, ein, sehr, langer, deutscher and 7 more': the unknown words for a refusal, each once."""
    distinct = list(dict.fromkeys(unknown))
    more = f" and {len(distinct) - most} more" if len(distinct) > most else ""
    return ", ".join(distinct[:most]) + more


def perhaps(guesses: list[Detection]) -> str:
    """' (perhaps German or Dutch)': langid's guesses of 10% or more, for a refusal; '' when there are none."""
    names = [guess.name for guess in guesses[:3] if guess.confidence >= 0.1]
    if not names:
        return ""
    return " (perhaps " + (", ".join(names[:-1]) + " or " if len(names) > 1 else "") + names[-1] + ")"


async def choose_source(text: str, target: str, pairs: dict[Pair, Route], config: TranslateConfig) -> tuple[str, str]:
    """The source language for `text`, detected among all languages, and what to say if its translation fails.

    A sure guess is the source (or a refusal: already the target, or no pair
    for it). An unsure one, or none, falls back on the likeliest source that a
    pair into `target` has: short texts that pair knows still translate, and
    the others fail the `untranslated` check with the returned message.
    """
    sources = {pair[0] for pair in pairs if pair[1] == target} - {target}
    name_it = f"/translate SRC>{target} TEXT"
    guesses = await asyncio.to_thread(rank_languages, text)
    best = guesses[0] if guesses else None
    if not sources and not uses_hub_models(config):
        example = best.code if best is not None and best.sure and best.code != target else \
            ("eng" if target != "eng" else "spa")
        raise SkillError(f"I can't translate into {language_name(target)}. {pairs_list(pairs, config)} "
                         f"{how_to_add((example, target), config)}")
    if best is not None and best.sure:
        if best.code == target:
            raise SkillError(f"That already looks like {best.name}. If it is another language, name it: {name_it}.")
        if best.code not in sources and not uses_hub_models(config):
            raise SkillError(f"That looks like {best.name}, and I can't translate from {best.name} into "
                             f"{language_name(target)}. {pairs_list(pairs, config)} "
                             f"{how_to_add((best.code, target), config)}")
        return best.code, ""
    cannot_tell = f"I can't tell which language that is{perhaps(guesses)}; name it: {name_it}. {pairs_list(pairs, config)}"
    rank = {guess.code: index for index, guess in enumerate(guesses)}
    likeliest = min(sources, key=lambda code: (rank.get(code, len(rank)), code), default=None)
    if likeliest is None:
        raise SkillError(cannot_tell)
    return likeliest, cannot_tell


async def translate(text: str, target: str, source: str | None, config: TranslateConfig) -> str:
    """`text` in `target` (ISO 639-3); the source language is detected when not given.

    Never the input passed off as a translation: a result that is mostly the
    input (`untranslated`) is a refusal that says why.
    """
    pairs = await available_pairs(config)
    failure = ""
    if source is None:
        source, failure = await choose_source(text, target, pairs, config)

    route = pairs.get((source, target)) or hub_route((source, target), config)
    if source == target:
        raise SkillError(f"I can't translate from {language_name(source)} into {language_name(target)}: "
                         f"they are the same language.")
    if route is None:
        raise SkillError(f"I can't translate from {language_name(source)} into {language_name(target)}. "
                         f"{pairs_list(pairs, config)} {how_to_add((source, target), config)}")
    kind, translator = route
    if kind == "transformers":
        try:
            backend = await backend_for("transformers", translator).get()
        except ModelUnavailable as exc:
            example = f'{{"{source}-{target}": "/models/{translator.rstrip("/").rsplit("/", 1)[-1]}"}}'
            raise SkillError(f"The translation model {translator!r} for {show_pair((source, target))} cannot be "
                             f"loaded ({exc}). Set plugins.translate.models to a local folder, e.g. {example}. "
                             f"{pairs_list(pairs, config)}") from None
        try:
            translation = await asyncio.to_thread(backend.translate, text, config.max_new_tokens, target)
        except SkillError as problem:
            raise SkillError(f"The translation model for {show_pair((source, target))} {problem}") from None
        unknown = []
    else:
        backend = await backend_for("apertium").get()
        translation, unknown = await backend.translate(text, translator, config.timeout)
    if untranslated(text, translation, unknown):
        why = f"{listing(unknown)} {'is' if len(set(unknown)) == 1 else 'are'} not in my dictionary" if unknown \
            else "it comes out unchanged"
        raise SkillError(failure or f"I couldn't translate that from {language_name(source)} into "
                                    f"{language_name(target)}: {why}. {pairs_list(pairs, config)}")
    return translation


async def cannot_translate(direction: str, word: str, config: TranslateConfig) -> SkillError:
    """The refusal for a word that is no language code or name: 'I can't translate into xx. Available pairs: ...'"""
    return SkillError(f"I can't translate {direction} {word}. {pairs_list(await available_pairs(config), config)}")


async def translate_command(ctx: CommandContext) -> str:
    languages, text = (ctx.args.split(None, 1) + ["", ""])[:2]
    if not text.strip():
        raise SkillError(f"Usage: {ctx.bot.command_prefix}translate {USAGE}, e.g. "
                         f"{ctx.bot.command_prefix}translate es Hello or {ctx.bot.command_prefix}translate spa>eng Hola")
    source_word, _, target_word = languages.rpartition(">")
    target = iso639_3(target_word)
    if target is None:
        raise await cannot_translate("into", target_word, ctx.config)
    source = iso639_3(source_word) if source_word else None
    if source_word and source is None:
        raise await cannot_translate("from", source_word, ctx.config)
    return await translate(check_length(text, ctx.config.max_chars), target, source, ctx.config)


@hookimpl
def chatforge_config_model():
    return TranslateConfig


@hookimpl
def chatforge_register_commands(register):
    register("translate", translate_command, help="translate text into another language", usage=USAGE)


@hookimpl
def chatforge_handle_text(message: Message, config: TranslateConfig):
    match = match_trigger(message.text, config.triggers)
    if match is None:
        return None
    named = match.groupdict()
    target = iso639_3(named["lang"]) if named.get("lang") else config.default_target
    source = iso639_3(named["source"]) if named.get("source") else None
    if target is None or (named.get("source") and source is None):
        return None  # "translate into a poem: ..." is not about a language; let the model answer
    text = match.group("text").strip().strip("\"'“”‘’«»")
    if not text:
        return None

    async def answer() -> str:
        return await translate(check_length(text, config.max_chars), target, source, config)

    return answer()
