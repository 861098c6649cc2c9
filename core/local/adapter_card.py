"""The card chatforge writes beside a LoRA adapter: which base model it was trained on, and how.

peft's own `adapter_config.json` names the base only by the path it had at
training time (for the embedded SmolLM2 a cache folder that differs between
machines) and loads an adapter onto any base of the same shape without a
word. The card records the base's weights fingerprint, so `generator.adapter`
can refuse an adapter trained on another model, and the prompt format, so a
transcript-trained adapter is not served with a chat template.

    {"format": 1,
     "base": {"name": "gpt2", "fingerprint": "3f2a..."},
     "prompt": {"chat_template": false, "system_prompt": "..."},
     "training": {...options, steps done...},
     "held_out_perplexity": {"before": 31.2, "after": 18.4}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CARD_NAME = "chatforge-adapter.json"
CARD_FORMAT = 1

MACHINE_SPECIFIC = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "chatforge_adapter"}
"""Config entries that differ for the same weights (where they were loaded from, which library saved them)."""


def weights_fingerprint(model: Any) -> str:
    """A short hash of the model's config and a sample of every weight: equal for the same base anywhere."""
    digest = hashlib.sha256()
    config = {key: value for key, value in model.config.to_dict().items() if key not in MACHINE_SPECIFIC}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_card(folder: Path, card: dict[str, Any]) -> Path:
    """Write the card (with its format number) into the adapter folder."""
    path = Path(folder) / CARD_NAME
    path.write_text(json.dumps({"format": CARD_FORMAT, **card}, indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def read_card(folder: Path) -> dict[str, Any] | None:
    """The card of an adapter folder; None when it has none (an adapter trained elsewhere, with peft alone)."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
