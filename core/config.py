"""Loading and validating the YAML config file.

One file configures everything. Values may use `${VAR}` or `${VAR:-default}`
to come from the environment (keep secrets there); a default may hold more
references, `${A:-${B}}`, as in the shell. Every problem is reported with its
YAML path and line, e.g.
`config.yaml:9: generator.max_new_tokens: must be a positive integer, got "lots"`,
but a value that holds an environment variable's is never shown: the message
names the variable instead. Files over 1 MB, YAML aliases that expand to more
than 10,000 values and nesting deeper than 100 levels are refused before
anything else is done with them.
Plugin and adapter sections are checked later by each plugin's own schema,
through `validate_section`, so their errors read the same way.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Optional

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo,
                      field_validator)
from pydantic_core import PydanticCustomError

CONFIG_ENV_VAR = "CHATFORGE_CONFIG"
DEFAULT_CONFIG_NAME = "config.yaml"


# ---------------------------------------------------------------- errors

@dataclass(frozen=True)
class ConfigIssue:
    """One thing wrong with a config file, located by its YAML path."""

    path: str
    message: str
    line: int | None = None

    def format(self, filename: str = "") -> str:
        where = f"{filename}:{self.line}: " if filename and self.line else (f"{filename}: " if filename else "")
        return f"{where}{self.path or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """A config file that cannot be used; `str()` lists every issue, one a line, in the order of the file.

    `settings`, when load_settings raised it, is the config with every wrong value left at its default: not
    for running, only so that `config check` can go on to check the plugins' and adapters' sections.
    """

    def __init__(self, issues: list[ConfigIssue], filename: str = "", settings: Settings | None = None) -> None:
        self.issues = sorted(issues, key=lambda issue: (issue.line is None, issue.line or 0))
        self.filename = filename
        self.settings = settings
        super().__init__("\n".join(issue.format(filename) for issue in self.issues))


class UsageError(Exception):
    """A wrong command-line argument (`--adapter slack`): blamed on the command line, not on a config file.

    `chatforge` prints each line after "chatforge: " and exits with status 2, as for a config error.
    """


# ---------------------------------------------------------------- field types

def _positive_int(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PydanticCustomError("positive_int", "must be a positive integer")
    return value


def _non_negative_number(value: Any) -> Any:
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:  # NaN too
        raise PydanticCustomError("non_negative_number", "must be a number of 0 or more")
    return number


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
NonNegativeFloat = Annotated[float, BeforeValidator(_non_negative_number)]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- core sections

DEFAULT_BACKEND = "transformers"


class GeneratorConfig(StrictModel):
    """The `generator:` section for the default backend, the local transformers model."""

    backend: Annotated[str, Field(min_length=1)] = DEFAULT_BACKEND
    """Which generator backend answers: `transformers` (the local model, these keys), `openai` (a model
    server speaking the OpenAI API, its own keys), or one a plugin registers."""
    model: str = "gpt2"
    """A Hugging Face Hub id, a local folder, or a .gguf file."""
    fallback: bool = True
    """When `model` cannot be had offline, use the embedded SmolLM2-135M-Instruct."""
    temperature: NonNegativeFloat = 0.7
    """0 means greedy decoding (same input, same answer). Left unset, this and the next three defer to
    the model's own recommended settings where it has some (the embedded SmolLM2: 0.2, top_p 0.9)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 50
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.1
    max_new_tokens: PositiveInt = 96
    """A reply cut by this limit ends at its last sentence, or with "…"."""
    seed: Optional[int] = None
    threads: PositiveInt = 1
    """torch threads; decoding is memory-bound, so one is usually as fast as more."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the model runs; `auto` is the GPU when torch sees one, else the CPU."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight precision; float16 is only fast (and only allowed) on a GPU."""
    quantize: Literal["none", "int8", "int8-dynamic"] = "none"
    """CPU only. `int8`: int8 weights, ~2.2-2.4x faster decoding, near-float32 quality;
    `int8-dynamic`: int8 activations too, ~2.8x faster but lossy (see chatforge.local.numerics)."""

    runtime: Literal["torch", "onnxruntime"] = "torch"
    """`onnxruntime`: the model is exported to ONNX once (cached in cache_dir) and run by ONNX Runtime on the
    CPU; with `quantize: int8` that decodes ~3.8x faster than plain transformers (4.3x and more with two
    threads on an idle machine). Needs chatforge[onnx]."""

    @field_validator("dtype")
    @classmethod
    def _dtype_fits_device(cls, dtype: str, info: ValidationInfo) -> str:
        if dtype == "float16" and info.data.get("device", "cuda") != "cuda":
            raise PydanticCustomError(
                "dtype_device", 'must be "float32" or "bfloat16" unless generator.device is "cuda" '
                "(float16 on the CPU is slow and loses precision)")
        return dtype

    @field_validator("quantize")
    @classmethod
    def _quantize_fits_device(cls, quantize: str, info: ValidationInfo) -> str:
        if quantize != "none" and info.data.get("device", "cpu") != "cpu":
            raise PydanticCustomError(
                "quantize_device", 'must be "none" unless generator.device is "cpu" '
                "(int8 quantization runs on the CPU only)")
        if quantize != "none" and info.data.get("dtype", "float32") != "float32":
            raise PydanticCustomError(
                "quantize_dtype", 'must be "none" unless generator.dtype is "float32" '
                "(the layers around the int8 ones stay float32)")
        return quantize

    @field_validator("runtime")
    @classmethod
    def _runtime_fits_numerics(cls, runtime: str, info: ValidationInfo) -> str:
        if runtime == "onnxruntime":
            if info.data.get("device", "cpu") != "cpu" or info.data.get("dtype", "float32") != "float32":
                raise PydanticCustomError(
                    "runtime_device", 'must be "torch" unless generator.device is "cpu" and generator.dtype is '
                    '"float32" (chatforge runs ONNX Runtime on the CPU, in float32 or with int8 weights)')
            if info.data.get("quantize", "none") == "int8-dynamic":
                raise PydanticCustomError(
                    "runtime_quantize", 'must be "torch" for quantize "int8-dynamic" (with onnxruntime, '
                    'use quantize "int8": int8 weights in blocks, near-float32 quality)')
        return runtime
    adapter: Optional[Annotated[str, Field(min_length=1)]] = None
    """A LoRA adapter folder (`chatforge finetune --out`), merged into `model` as it loads; relative to the
    config file's folder. Refused if its card says it was trained on another base or prompt format.
    Remove the key to answer with the base model again."""
    context_window: Optional[PositiveInt] = None
    """Tokens the model sees at most; default: what the model declares."""
    system_prompt: str = (
        "You are chatforge, a friendly and helpful assistant. Answer briefly and truthfully, "
        "in the language of the user."
    )
    """The language clause keeps small models in the user's language (SmolLM2-135M: German questions
    answered in German 9 of 10 seeded runs with it, 5 of 10 without)."""
    stop: list[str] = []
    """Extra stop sequences, besides the transcript's own role markers."""
    cache_dir: str = "~/.cache/chatforge"
    """Where converted models (GGUF -> safetensors) are kept."""
    kv_cache: bool = True
    """Keep each conversation's attention cache between turns: a follow-up computes only its new tokens
    before answering (same output, much sooner first token with long history)."""
    kv_cache_conversations: PositiveInt = 16
    """Conversations whose cache is kept at most; the least recently used is dropped first."""
    kv_cache_mb: Annotated[float, Field(gt=0)] = 512.0
    """Memory all kept caches may use, in MiB (GPT-2 in float32: about 72 KiB a token)."""
    max_batch: PositiveInt = 8
    """Replies decoded together, one forward pass per token for all of them; more conversations wait
    for a place. Decoding is memory-bound, so 8 at once take little longer than one; 1 answers in turn."""


DEFAULT_MEMORY_BACKEND = "sqlite"


class MemoryConfig(StrictModel):
    """The `memory:` section: the engine's keys, and the default backend's `path`.

    Another backend's own keys (`url`, `pool_size` for postgres) are its `Config`'s to validate
    (PluginHost, once plugins have registered their backends); here they are set aside."""

    backend: Annotated[str, Field(min_length=1)] = DEFAULT_MEMORY_BACKEND
    """A registered memory backend: `sqlite` (default), `memory` (nothing kept), `postgres`, or a plugin's."""
    path: str = "~/.local/share/chatforge/memory.sqlite3"
    """sqlite: the file; a relative path is relative to the config file's folder."""
    scope: Literal["user", "chat"] = "user"
    """`user`: each person in a chat has their own memory; `chat`: the chat shares one."""
    max_turns: PositiveInt = 20
    """Turns (a user line or a bot line) recalled as context."""
    max_tokens: PositiveInt = 768
    """Tokens of history given to the model at most (also capped by its context window)."""
    retention_days: Optional[Annotated[float, Field(gt=0)]] = None
    """Delete turns older than this many days (checked at start and hourly); null keeps them."""
    redact: list[Literal["email", "phone", "card"]] = []
    """Personal data replaced by [email], [phone], [card] before storage and before the model sees it."""


class BotConfig(StrictModel):
    name: str = "chatforge"
    command_prefix: Annotated[str, Field(min_length=1, max_length=3)] = "/"
    shutdown_timeout: Annotated[float, Field(gt=0)] = 10.0
    """On SIGINT/SIGTERM, seconds to let replies in flight finish before stopping."""
    admins: list[str] = []
    """Who may use admin-only commands: "platform:user id" ("telegram:12345", "discord:8019..."), or "console:*"."""


class LimitsConfig(StrictModel):
    max_message_chars: PositiveInt = 4000
    """Longer messages get a polite refusal (and are not stored)."""
    max_reply_chars: Annotated[int, Field(ge=100)] = 16000
    """Longer replies are cut at a paragraph (adapters split what remains into the platform's messages)."""
    rate_per_minute: Annotated[float, Field(gt=0)] = 20.0
    """Messages a user may send per minute, on average..."""
    rate_burst: PositiveInt = 5
    """...and at once. Beyond that a message is dropped, with one polite "slow down" a minute."""
    max_pending: PositiveInt = 64
    """Messages being answered or waiting (in the engine or an adapter's queue), across all chats; beyond:
    dropped, with one "I'm busy" a minute per conversation."""
    hook_timeout: Annotated[float, Field(gt=0)] = 30.0
    """Seconds a plugin's hook or command may take before it is given up on."""


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class EnvValue(NamedTuple):
    """A config value that holds the value of one or more environment variables (maybe a secret)."""

    written: str
    """The text in the file, `${VAR}` and all: safe to show."""
    value: str
    """What it became: never shown."""
    variables: list[str]
    """The variables whose (non-empty) values it holds."""


class PluginSection(BaseModel):
    """The keys every plugin section has; the rest belongs to the plugin's schema."""

    model_config = ConfigDict(extra="allow")
    enabled: bool = True
    module: Optional[str] = None
    """Load this plugin from an import path (`pkg.mod`) or a `.py` file."""


class AdapterSection(BaseModel):
    model_config = ConfigDict(extra="allow")
    enabled: bool = False


def _only_the_backend_of_another_one(section: Any) -> Any:
    """Another backend's `generator:` keys are that backend's to validate (PluginHost, once plugins have
    registered their backends): here only `backend` is checked. The section stays in `Settings.raw`."""
    if isinstance(section, dict) and section.get("backend", DEFAULT_BACKEND) != DEFAULT_BACKEND:
        return {"backend": section["backend"]}
    return section


def _only_the_engine_keys_for_another_store(section: Any) -> Any:
    """With `memory.backend` other than sqlite, the keys that are not the engine's are that backend's to
    validate (PluginHost); the section stays whole in `Settings.raw`."""
    if isinstance(section, dict) and section.get("backend", DEFAULT_MEMORY_BACKEND) != DEFAULT_MEMORY_BACKEND:
        engine_keys = set(MemoryConfig.model_fields) - {"path"}
        return {key: value for key, value in section.items() if key in engine_keys}
    return section


class Settings(StrictModel):
    generator: Annotated[GeneratorConfig, BeforeValidator(_only_the_backend_of_another_one)] = GeneratorConfig()
    memory: Annotated[MemoryConfig, BeforeValidator(_only_the_engine_keys_for_another_store)] = MemoryConfig()
    bot: BotConfig = BotConfig()
    limits: LimitsConfig = LimitsConfig()
    logging: LoggingConfig = LoggingConfig()
    plugins: dict[str, PluginSection] = {}
    adapters: dict[str, AdapterSection] = {}

    # Not from YAML: where the file was, to resolve relative paths and name errors.
    source: Optional[Path] = Field(default=None, exclude=True)
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    lines: dict[str, int] = Field(default_factory=dict, exclude=True, repr=False)
    env_references: dict[str, list[str]] = Field(default_factory=dict, exclude=True, repr=False)
    """YAML path -> the environment variables its value was made from, to name them in errors."""
    from_environment: dict[str, EnvValue] = Field(default_factory=dict, exclude=True, repr=False)
    """YAML path -> how a value that holds some environment variable's value was written: errors about
    it name the variables, never the value."""

    def resolve_path(self, value: str) -> Path:
        """A path from the config: `~` expanded, relative ones taken from the config's folder."""
        path = Path(os.path.expanduser(value))
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    @property
    def filename(self) -> str:
        return str(self.source) if self.source else "<defaults>"


# Fields set by the loader, not read from YAML: a config file may not set them.
_INTERNAL_KEYS = frozenset(name for name, info in Settings.model_fields.items() if info.exclude)


# ---------------------------------------------------------------- loading

_ENV_TOKEN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\}|:-)|\}")
"""What substitution looks for: `${NAME}`, `${NAME:-` (a default follows, up to its `}`), or a `}`."""


@dataclass
class _Expansion:
    value: str
    referenced: list[str]
    """Every variable named, in order, also in defaults that were not needed."""
    used: list[str]
    """The variables whose non-empty values are in `value`."""
    missing: list[str]
    """Variables without a default that are not set (and were needed)."""
    unclosed: str | None = None
    """The first `${NAME:-` without its `}`."""


def _expand(text: str) -> _Expansion:
    """Substitute `${VAR}` and `${VAR:-default}` in one pass; a default may hold more references, as in the shell.

    Linear in the text (a regex with `[^}]*` retried at every `${` was quadratic): each piece goes into `out`
    once and is dropped at most once, when the variable of an open default turns out to be set.
    """
    out: list[str] = []
    result = _Expansion("", [], [], [])
    defaults: list[tuple[str, int, int, int]] = []  # each open `${NAME:-`: NAME, and where its default starts
    position = 0
    for match in _ENV_TOKEN.finditer(text):
        out.append(text[position:match.start()])
        position = match.end()
        name, opening = match.groups()
        if name is None:  # a "}"
            if not defaults:
                out.append("}")
                continue
            name, start, used, missing = defaults.pop()
            value = os.environ.get(name)
            if value:  # as in the shell, `:-` also replaces a set but empty variable
                del out[start:], result.used[used:], result.missing[missing:]
                out.append(value)
                result.used.append(name)
            continue
        result.referenced.append(name)
        if opening == ":-":
            defaults.append((name, len(out), len(result.used), len(result.missing)))
            continue
        value = os.environ.get(name)
        if value is None:
            result.missing.append(name)
        elif value:
            out.append(value)
            result.used.append(name)
    out.append(text[position:])
    result.value = "".join(out)
    result.unclosed = defaults[0][0] if defaults else None
    return result


def _substitute_env(node: Any, path: str, issues: list[ConfigIssue], references: dict[str, list[str]],
                    from_environment: dict[str, EnvValue]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string value, recursively; note which VARs each used."""
    if isinstance(node, dict):
        return {key: _substitute_env(value, _join(path, key), issues, references, from_environment)
                for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute_env(value, _join(path, i), issues, references, from_environment)
                for i, value in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    expansion = _expand(node)
    if expansion.referenced:
        references[path] = expansion.referenced
    if expansion.used:
        from_environment[path] = EnvValue(node, expansion.value, expansion.used)
    if expansion.unclosed is not None:
        issues.append(ConfigIssue(path, f'"${{{expansion.unclosed}:-" has no closing "}}"'))
        return node
    issues.extend(ConfigIssue(path, f"environment variable {name} is not set") for name in expansion.missing)
    return expansion.value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _line_numbers(root: yaml.Node | None) -> dict[str, int]:
    """Map each YAML path (`a.b.0.c`) to the 1-based line where its value starts."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = _join(path, key_node.value)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[_join(path, index)] = item.start_mark.line + 1
                walk(item, _join(path, index))

    if root is not None:
        walk(root, "")
    return lines


MAX_CONFIG_BYTES = 1_000_000
"""A config file is a few KB; a bigger one is the wrong file (PyYAML needs about a second per MB)."""
MAX_ALIASED_VALUES = 10_000
"""Values that YAML aliases (`*name`) may add in all, counted expanded: a few `<<: *defaults` need far fewer,
and an alias bomb (nine aliases of nine aliases of...) turns 500 bytes into 9**9 values."""
MAX_DEPTH = 100
"""Mappings and lists nested deeper than this are refused (the loader and the checks recurse)."""


class _Refused(yaml.YAMLError):
    """A YAML file that is valid but would cost too much to load."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, with its composer counting what aliases expand to and how deep nodes nest."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # nodes composed so far, each alias counted as the nodes it stands for
        self._aliased = 0  # of which through aliases
        self._sizes: dict[int, int] = {}  # id(anchored node) -> its nodes, aliases expanded; set once complete
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # else PyYAML's own "found undefined alias"
                size = self._sizes.get(id(node))
                if size is None:
                    raise _Refused(f"YAML alias *{event.anchor} refers to itself", event.start_mark)
                self._values += size
                self._aliased += size
                if self._aliased > MAX_ALIASED_VALUES:
                    raise _Refused(f"YAML aliases (*name) expand to more than {MAX_ALIASED_VALUES} values; "
                                   "a config file needs far fewer", event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        before = self._values
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._values += 1
        if event.anchor is not None:
            self._sizes[id(node)] = self._values - before
        return node


def _read_config(path: Path, filename: str) -> str:
    """The file's text, read no further than MAX_CONFIG_BYTES (a device such as /dev/zero never ends)."""
    try:
        with path.open(encoding="utf-8") as file:
            text = file.read(MAX_CONFIG_BYTES + 1)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("", "config file not found")], filename) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read config file: {exc}")], filename) from None
    if len(text) > MAX_CONFIG_BYTES or size > MAX_CONFIG_BYTES:
        cap = f"{MAX_CONFIG_BYTES / 1e6:g} MB"
        shown = f"{size / 1e6:.1f} MB" if size > MAX_CONFIG_BYTES else f"more than {cap}"  # a device has no size
        raise ConfigError([ConfigIssue("", f"config file is too large: {shown} (at most {cap})")], filename)
    return text


def _parse_yaml(text: str, filename: str) -> tuple[Any, dict[str, int]]:
    """The YAML document and the line of each path, parsed once, within the bounds above."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        return (loader.construct_document(root) if root is not None else None), _line_numbers(root)
    except _Refused as exc:
        raise ConfigError([ConfigIssue("", exc.problem, exc.problem_mark.line + 1)], filename) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark else None
        raise ConfigError([ConfigIssue("", f"not valid YAML: {problem}", line)], filename) from None
    finally:
        loader.dispose()


def _describe(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


# pydantic's error types whose own message is not plain words, and what to say instead ({...}: the
# error's context). Types not listed keep pydantic's message, "Input should be" turned into "must be".
_PLAIN_MESSAGES = {
    "missing": "is required",
    "string_too_short": "must be at least {min_length} characters long",
    "string_too_long": "must be at most {max_length} characters long",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "int_from_float": "must be a valid integer",
    "int_parsing": "must be a valid integer",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "dict_type": "must be a mapping of keys to values",
}
_EMPTY = "must not be empty"
"""What a minimum length of 1 means (the empty value is then not repeated)."""


def issues_from_validation(
    error: ValidationError, prefix: str, data: Any, model: type[BaseModel],
    from_environment: dict[str, EnvValue] | None = None,
) -> list[ConfigIssue]:
    """Turn pydantic's errors into ConfigIssues in plain words, each with the wrong value.

    Unless it is secret: a SecretStr field's value is never shown, nor is one that came from the environment
    (`from_environment`, by YAML path); the variables are named instead.
    """
    issues = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join([prefix, *loc] if prefix else loc)
        kind, context = item["type"], item.get("ctx") or {}
        if kind == "extra_forbidden":
            issues.append(ConfigIssue(path, "unknown key" + _suggestion(loc, model)))
            continue
        if kind in ("string_too_short", "too_short") and context.get("min_length") == 1:
            message = _EMPTY
        elif kind in _PLAIN_MESSAGES:
            message = _PLAIN_MESSAGES[kind].format(**context)
        elif kind in ("value_error", "assertion_error") and "error" in context:
            message = str(context["error"])  # a validator's own words
            message = message if message.startswith("must ") else f"must be {message}"
        else:
            message = re.sub(r"^(Input should be|Value should be) ?", "must be ", item["msg"])
        sources = _sources(path, from_environment or {})
        if sources:
            message = _hide_values(message, sources)
            if kind != "missing" and message != _EMPTY:
                message += f", got {_name_variables(sources)}"
        elif "input" in item and kind != "missing" and message != _EMPTY and not _is_secret(loc, model) \
                and not _shows(message, item["input"]):
            message += f", got {_describe(item['input'])}"
        issues.append(ConfigIssue(path, message))
    return issues


def _sources(path: str, from_environment: dict[str, EnvValue]) -> list[EnvValue]:
    """The values from the environment in the value at `path`: its own, its parent's (one value may be read
    as a list of it), or its children's (an error about a whole section)."""
    return [source for key, source in from_environment.items()
            if key == path or path.startswith(key + ".") or key.startswith(path + ".")]


def _hide_values(message: str, sources: list[EnvValue]) -> str:
    """A validator's message with each value from the environment (bare or quoted) shown as it was written."""
    written = {}
    for source in sources:
        if source.value:
            written.update({_describe(source.value): _describe(source.written),
                            repr(source.value): repr(source.written), source.value: source.written})
    if not written:
        return message
    pattern = "|".join(re.escape(form) for form in sorted(written, key=len, reverse=True))
    return re.sub(pattern, lambda match: written[match.group()], message)


def _name_variables(sources: list[EnvValue]) -> str:
    """'the value of ${TOKEN} (from the environment)', for an error that may not show the value."""
    names = [f"${{{name}}}" for name in dict.fromkeys(name for source in sources for name in source.variables)]
    if len(names) == 1:
        return f"the value of {names[0]} (from the environment)"
    return f"the values of {', '.join(names[:-1])} and {names[-1]} (from the environment)"


def _shows(message: str, value: Any) -> bool:
    """Whether a validator's message already quotes the text (then it is not repeated)."""
    return isinstance(value, str) and any(form in message for form in (repr(value), _describe(value)))


def _is_secret(loc: list[str], model: type[BaseModel]) -> bool:
    """Whether the value at `loc` is a SecretStr field (its bad value must not be echoed)."""
    fields: dict[str, Any] = model.model_fields
    for part in loc:
        info = fields.get(part)
        if info is None:
            return False
        annotations = [info.annotation, *typing.get_args(info.annotation)]
        if SecretStr in annotations:
            return True
        nested = [a for a in annotations if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return False
        fields = nested[0].model_fields
    return False


def _suggestion(loc: list[str], model: type[BaseModel]) -> str:
    """' (did you mean "x"?)' for a misspelt key, found among the model's fields."""
    fields: dict[str, Any] = model.model_fields
    for part in loc[:-1]:
        annotation = fields.get(part).annotation if part in fields else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
        else:
            return ""
    fields = {name: info for name, info in fields.items() if not info.exclude}
    close = difflib.get_close_matches(loc[-1], list(fields), n=1)
    return f' (did you mean "{close[0]}"?)' if close else f" (known keys: {', '.join(fields)})"


def find_config_file(explicit: str | None) -> Path | None:
    """The file to use: --config, then $CHATFORGE_CONFIG, then ./config.yaml, else built-in defaults."""
    chosen = explicit or os.environ.get(CONFIG_ENV_VAR)
    if chosen:
        return Path(chosen).expanduser()
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def load_settings(path: Path | None) -> Settings:
    """Read, substitute and validate a config file; raise ConfigError listing every problem."""
    filename = str(path) if path else "<defaults>"
    text = _read_config(path, filename) if path is not None else ""
    data, lines = _parse_yaml(text, filename) if text.strip() else (None, {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", f"must be a mapping of sections, got {_describe(data)}")], filename)

    return load_settings_from_dict(data, path, lines)


def load_settings_from_dict(
    data: dict[str, Any], path: Path | None = None, lines: dict[str, int] | None = None
) -> Settings:
    """Validate config already parsed from YAML (or written as a dict in a test)."""
    filename = str(path) if path else "<defaults>"
    lines = lines or {}
    issues: list[ConfigIssue] = []
    references: dict[str, list[str]] = {}
    from_environment: dict[str, EnvValue] = {}
    data = _substitute_env(data, "", issues, references, from_environment)
    for key in [key for key in data if key in _INTERNAL_KEYS]:
        issues.append(ConfigIssue(key, "unknown key" + _suggestion([key], Settings)))
    data = {key: value for key, value in data.items() if key not in _INTERNAL_KEYS}
    settings = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        issues.extend(issues_from_validation(exc, "", data, Settings, from_environment))
        settings = _with_defaults_for_errors(data, exc)
    if settings is not None:
        settings.source = path.resolve() if path else None
        settings.raw = data
        settings.lines = lines
        settings.env_references = references
        settings.from_environment = from_environment
    if issues:
        raise ConfigError(locate(issues, lines), filename, settings=settings)
    assert settings is not None
    return settings


def _with_defaults_for_errors(data: dict[str, Any], error: ValidationError) -> Settings | None:
    """Settings from `data` with every value pydantic rejected removed (so its default applies), or None.

    A removal can reveal another error (a value checked against one now at its default), so this repeats;
    each round removes at least one key, so it ends.
    """
    data = copy.deepcopy(data)
    while True:
        keys = {_rejected_key(data, item["loc"]) for item in error.errors()}
        if None in keys:
            return None
        for key in keys:
            _delete(data, key)
        try:
            return Settings.model_validate(data)
        except ValidationError as again:
            error = again


def _rejected_key(data: dict[str, Any], loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The path of the deepest mapping key along `loc` (for a list item, its list's), or None."""
    node: Any = data
    found: tuple[Any, ...] = ()
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        node, found = node[part], (*found, part)
    return found or None


def _delete(data: dict[str, Any], key: tuple[Any, ...]) -> None:
    node: Any = data
    for part in key[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(key[-1], None)


def locate(issues: list[ConfigIssue], lines: dict[str, int]) -> list[ConfigIssue]:
    """Attach line numbers: the issue's own path, or its nearest parent that has one."""
    located = []
    for issue in issues:
        path, line = issue.path, None
        while path and line is None:
            line = lines.get(path)
            path = path.rpartition(".")[0]
        located.append(ConfigIssue(issue.path, issue.message, issue.line or line))
    return located


def validate_section(
    model: type[BaseModel], data: dict[str, Any], prefix: str, settings: Settings
) -> tuple[BaseModel | None, list[ConfigIssue]]:
    """Validate one plugin's or adapter's section with that plugin's own model."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        issues = issues_from_validation(exc, prefix, data, model, settings.from_environment)
        return None, locate(issues, settings.lines)
