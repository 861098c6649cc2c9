"""`generator.adapter`: a LoRA adapter merged into the base model as it loads.

peft would load an adapter onto any base of the same shape without a word, and
an unmerged PeftModel is a wrapper the rest of the generator does not expect
(its forward takes no position_ids, so the batcher would refuse it). So the
adapter is checked against its card (core/local/adapter_card.py: the base's
weights fingerprint and the prompt format it was trained with), loaded with
`PeftModel.from_pretrained` and merged into the float32 weights with
`merge_and_unload`, before the model is put on its device, cast, quantized or
exported: batching, per-conversation cache reuse, int8 and ONNX Runtime then
see a plain transformers model.

The merged model's config names the adapter by a hash of its files
(`config.chatforge_adapter`), so the ONNX export cached for the base (keyed by
the config and a sample of the weights) is never served for the merged model.

Reading the folder and the card (`read_adapter`, `Adapter.describe`) needs
neither torch nor peft: `chatforge plugins` uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter_card import CARD_FORMAT, CARD_NAME, read_card, weights_fingerprint
from .model_loading import LoadedModel

log = logging.getLogger("chatforge.generator")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_ATTRIBUTE = "chatforge_adapter"
"""Set on the merged model's config: the adapter's identity, which makes the ONNX cache key differ."""


class AdapterError(ValueError):
    """`generator.adapter` cannot be served; the message says why (the caller names the config key)."""


@dataclass(frozen=True)
class Adapter:
    """An adapter folder as read from disk: peft's config and chatforge's card (None if it has none)."""

    path: Path
    peft_config: dict[str, Any]
    card: dict[str, Any] | None

    def describe(self) -> str:
        """One line for `chatforge plugins` and `/stats`: where it is, its rank, and what training did."""
        parts = [f"LoRA rank {self.peft_config.get('r', '?')}"]
        if self.card is None:
            parts.append("no chatforge card: its base was not checked")
        else:
            steps = (self.card.get("training") or {}).get("steps")
            if isinstance(steps, int):
                parts.append(f"{steps} training steps")
            perplexity = self.card.get("held_out_perplexity") or {}
            before, after = perplexity.get("before"), perplexity.get("after")
            if isinstance(before, (int, float)) and isinstance(after, (int, float)):
                parts.append(f"held-out perplexity {before:.2f} -> {after:.2f}")
        return f"{self.path} ({'; '.join(parts)})"


def read_adapter(path: Path) -> Adapter:
    """The adapter in `path`, checked to be a LoRA adapter folder with weights and a well-formed card, if any.

    Cheap (no torch): done before the model loads, so a wrong path costs no load.
    """
    if not path.exists():
        raise AdapterError(f"no such folder: {path}")
    if not path.is_dir():
        raise AdapterError(f"{path} is not a folder (a LoRA adapter is a folder with {CONFIG_FILE} and its weights)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a LoRA adapter (it has no {CONFIG_FILE}; "
                           "`chatforge finetune --out` writes one)")
    peft_config = _read_json(config_file)
    if not isinstance(peft_config, dict):
        raise AdapterError(f"{config_file} is not a peft adapter config (not a JSON object)")
    kind = peft_config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{path} is a {kind or 'unknown kind of'} adapter; chatforge serves LoRA adapters only")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise AdapterError(f"{path} has no {WEIGHT_FILES[0]} (the adapter's weights)")
    try:
        card = read_card(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path / CARD_NAME} is not valid JSON: {exc}") from None
    if card is not None:
        _check_card(card, path / CARD_NAME)
    return Adapter(path, peft_config, card)


def apply(loaded: LoadedModel, adapter: Adapter) -> None:
    """Check the adapter against the loaded base, then merge it in: `loaded.model` becomes the merged model.

    After an AdapterError from the merge the base may hold half-injected LoRA layers: do not use it.
    """
    check_base(adapter, loaded)
    started = time.perf_counter()
    loaded.model = merge(loaded.model, adapter)
    log.info("LoRA adapter %s merged into %s in %.2f s", adapter.path, loaded.name, time.perf_counter() - started)


def load_adapter(loaded: LoadedModel, path: Path) -> Adapter:
    """`read_adapter` and `apply` in one: the adapter at `path`, merged into `loaded.model`."""
    adapter = read_adapter(path)
    apply(loaded, adapter)
    return adapter


def check_base(adapter: Adapter, loaded: LoadedModel) -> None:
    """Refuse an adapter whose card names another base or prompt format; warn about one with no card."""
    card = adapter.card
    if card is None:
        log.warning("generator.adapter: %s has no %s (it was not made by chatforge finetune), so the base it was "
                    "trained on cannot be checked: if it was not %s, the answers will be nonsense",
                    adapter.path, CARD_NAME, loaded.name)
        return
    trained_on, fingerprint = card["base"].get("name", "?"), card["base"]["fingerprint"]
    ours = weights_fingerprint(loaded.model)
    if fingerprint != ours:
        raise AdapterError(
            f"{adapter.path} was trained on {trained_on} (weights fingerprint {fingerprint}), but generator.model "
            f"is {loaded.name} (fingerprint {ours}){' (the embedded fallback)' if loaded.fell_back else ''}: "
            "serve it with the model it was trained on, or train one on this model with chatforge finetune")
    trained_chat = bool(card["prompt"]["chat_template"])
    serving_chat = bool(getattr(loaded.tokenizer, "chat_template", None))
    if trained_chat and not serving_chat:
        raise AdapterError(f"{adapter.path} was trained with a chat template, but generator.model's tokenizer has "
                           "none (it would be given User:/Bot: transcripts): train it again on this model")
    if serving_chat and not trained_chat:
        raise AdapterError(f"{adapter.path} was trained on User:/Bot: transcripts, but generator.model's tokenizer "
                           "has a chat template (it would be given that): train it again on this model")


def merge(model: Any, adapter: Adapter) -> Any:
    """`model` with the adapter's LoRA weights merged in (float32), a plain transformers model again."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import load_peft_weights

    if model.dtype != torch.float32:
        model = model.float()  # merging into bfloat16 weights would round the small LoRA updates away
    with warnings.catch_warnings():
        # transformers renamed is_gradient_checkpointing; every peft 0.21 load asks for the old name.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # Missing layers are reported below, with the module names, as an error.
        warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
        try:
            wrapped = PeftModel.from_pretrained(model, str(adapter.path))
        except Exception as exc:  # noqa: BLE001 - any failure is the adapter's, and said in plain words
            raise AdapterError(_load_failure(adapter, exc)) from None
        saved = set(load_peft_weights(str(adapter.path), device="cpu"))
        placed = set(get_peft_model_state_dict(wrapped))
        if saved != placed:
            raise AdapterError(_layer_mismatch(adapter, unused=saved - placed, missing=placed - saved))
        try:
            merged = wrapped.merge_and_unload(safe_merge=True)
        except ValueError as exc:  # safe_merge found NaNs
            raise AdapterError(f"{adapter.path} cannot be merged: {exc}") from None
    setattr(merged.config, CONFIG_ATTRIBUTE, {"sha256": _files_digest(adapter.path)})
    return merged.eval()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise AdapterError(f"{path} cannot be read: {exc}") from None


def _check_card(card: Any, path: Path) -> None:
    """A card must say which base (by fingerprint) and which prompt format; a newer format is not guessed at."""
    if not isinstance(card, dict):
        raise AdapterError(f"{path} is not a chatforge adapter card (not a JSON object)")
    version = card.get("format")
    if isinstance(version, int) and version > CARD_FORMAT:
        raise AdapterError(f"{path} is card format {version}, from a newer chatforge (this one reads format "
                           f"{CARD_FORMAT}): upgrade chatforge")
    base, prompt = card.get("base"), card.get("prompt")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise AdapterError(f"{path} does not say which base it was trained on (no base.fingerprint)")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chat_template"), bool):
        raise AdapterError(f"{path} does not say which prompt format it was trained with (no prompt.chat_template)")


def _load_failure(adapter: Adapter, exc: Exception) -> str:
    """What peft's refusal means, without its traceback: another architecture, other shapes, or a broken file."""
    from peft.utils.error import NoMatchingPeftModuleError

    if isinstance(exc, NoMatchingPeftModuleError):
        targets = adapter.peft_config.get("target_modules")
        shown = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
        return (f"{adapter.path} does not fit generator.model: it changes modules ({shown}) that the model does "
                "not have, so it was made for another architecture")
    mismatches = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", str(exc))
    if mismatches:
        name, theirs, ours = mismatches[0]
        more = f" and {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
        return (f"{adapter.path} does not fit generator.model, which has other layer sizes (size mismatch for "
                f"{_module(name)}: {theirs} in the adapter, {ours} in the model{more}): it was made for another model")
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{adapter.path} cannot be loaded: {type(exc).__name__}: {first_line}"


def _layer_mismatch(adapter: Adapter, unused: set[str], missing: set[str]) -> str:
    """peft skips adapter weights for layers the model lacks, and leaves layers the adapter lacks random."""
    if unused:
        modules = sorted({_module(key) for key in unused})
        return (f"{adapter.path} does not fit generator.model: it has weights for {len(modules)} modules the model "
                f"lacks ({', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''}), so it was made for another, "
                "larger model")
    modules = sorted({_module(key) for key in missing})
    return (f"{adapter.path} does not fit generator.model: it has no weights for {len(modules)} of the modules it "
            f"targets ({', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''}), so it was made for another, "
            "smaller model")


def _module(key: str) -> str:
    """`base_model.model.transformer.h.2.attn.c_attn.lora_A.weight` -> `transformer.h.2.attn.c_attn`."""
    key = re.sub(r"^base_model\.model\.", "", key)
    return re.sub(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.[^.]+)*$", "", key)


def _files_digest(path: Path) -> str:
    """A hash of the adapter's config and weights: the same adapter anywhere, another adapter otherwise."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            with file.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]
