"""`generator.adapter`: a LoRA adapter merged into the base as it loads, on tiny models built in the tests.

The adapters are made here with peft directly (random, non-zero LoRA weights, so that they change what the
model says), saved as `chatforge finetune` saves them, with the card `write_card` writes. The merged model must
compute what peft's unmerged model computes, and everything the generator does with a plain model (batching,
cache reuse between turns, int8, ONNX Runtime) must keep working on the merged weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from chatforge.app import create_generator
from chatforge.config import ConfigError, load_settings, load_settings_from_dict
from chatforge.local import lora, onnx_runtime
from chatforge.local.adapter_card import weights_fingerprint, write_card
from chatforge.local.model_loading import LoadedModel, load_model
from chatforge.local.numerics import Int8Linear
from chatforge.local.onnx_runtime import OnnxCausalLM
from chatforge.memory import Turn
from chatforge.plugin_manager import PluginHost
from chatforge.testing import make_bot

SYSTEM = "Be nice."
PROMPTS = [f"conversation {i}: " + "tell me about the sea " * (i * 2) for i in range(5)]
MESSAGES = ["hello there, how are you today?", "what is the weather like?", "The capital of France is Paris."]
CARD_STEPS = 12
CARD_PERPLEXITY = {"before": 31.25, "after": 18.5}


@contextlib.contextmanager
def quiet_peft():
    """peft's from_pretrained/get_peft_model warn that transformers renamed is_gradient_checkpointing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def make_adapter(model, folder: Path, base_name: str, card: bool = True, chat_template: bool = False,
                 seed: int = 1) -> Path:
    """A LoRA adapter for `model` with random non-zero weights, saved by peft, with a card as training writes."""
    from peft import LoraConfig, TaskType, get_peft_model

    fingerprint = weights_fingerprint(model)  # of the base, before LoRA layers are added, as training does
    gpt2 = model.config.model_type == "gpt2"
    targets = ["attn.c_attn", "attn.c_proj"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(seed)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=gpt2, init_lora_weights=False)
    with quiet_peft():
        get_peft_model(copy.deepcopy(model), config).save_pretrained(folder)
    if card:
        write_card(folder, {
            "base": {"name": base_name, "fingerprint": fingerprint},
            "prompt": {"chat_template": chat_template, "system_prompt": SYSTEM},
            "training": {"steps": CARD_STEPS, "lora_r": 4, "learning_rate": 2e-4},
            "held_out_perplexity": dict(CARD_PERPLEXITY),
        })
    return folder


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2, model_cache):
    """The tiny GPT-2 as the generator loads it (for reading only: tests that merge load their own copy)."""
    return load_model(str(tiny_gpt2), model_cache)


@pytest.fixture(scope="module")
def gpt2_adapter(gpt2, tiny_gpt2, tmp_path_factory) -> Path:
    return make_adapter(gpt2.model, tmp_path_factory.mktemp("adapters") / "tone", str(tiny_gpt2))


def write_config(folder: Path, model: Path, lines: str = "") -> Path:
    path = folder / "config.yaml"
    path.write_text(f"generator:\n  model: {model}\n  cache_dir: {folder / 'cache'}\n  temperature: 0\n"
                    f"  max_new_tokens: 16\n  system_prompt: {SYSTEM}\n  stop: [never-appears]\n{lines}"
                    "memory:\n  backend: memory\n")
    return path


def generator_for(folder: Path, model: Path, lines: str = ""):
    return create_generator(load_settings(write_config(folder, model, lines)))


def fresh_copy(loaded: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name)


def answer_all(generator, prompts, history=()) -> list[str]:
    async def crowd():
        return await asyncio.gather(*(generator.reply(list(history), text) for text in prompts))

    return asyncio.run(crowd())


def converse(generator, messages):
    """Talk as the engine does (history grows by each message and reply); the replies and each turn's stats."""
    history, replies, stats = [], [], []

    async def talk():
        for text in messages:
            reply = await generator.reply(list(history), text)
            replies.append(reply)
            stats.append(generator.last_stats)
            history.extend([Turn("user", text), Turn("assistant", reply)])

    asyncio.run(talk())
    return replies, stats


def logits(model, tokenizer, texts=("hello there, how are you today?", "The capital of France is Paris.")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize("model", ["gpt2", "tiny_llama"])
def test_the_merged_model_computes_what_the_unmerged_adapter_computes(model, request, tmp_path):
    from peft import PeftModel

    loaded = request.getfixturevalue(model)
    folder = make_adapter(loaded.model, tmp_path / "adapter", loaded.name)
    with quiet_peft():
        unmerged = PeftModel.from_pretrained(copy.deepcopy(loaded.model), folder).eval()
    merged = fresh_copy(loaded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = lora.load_adapter(merged, folder)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], "peft's FutureWarning leaked"
    assert type(merged.model) is type(loaded.model)  # a plain transformers model again, no peft wrapper
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    expected, got, base = (logits(m, loaded.tokenizer) for m in (unmerged, merged.model, loaded.model))
    assert (got - expected).abs().max() < 1e-5, (got - expected).abs().max()
    assert (got - base).abs().max() > 1e-2  # the adapter really changes the model
    assert adapter.path == folder and adapter.card["training"]["steps"] == CARD_STEPS


def test_the_engine_with_the_adapter_answers_differently(tmp_path, tiny_gpt2, gpt2_adapter):
    (tmp_path / "adapters").mkdir()
    shutil.copytree(gpt2_adapter, tmp_path / "adapters" / "tone")
    admin = {"bot": {"admins": ["test:tester"]}}
    plain = make_bot(admin, generator=generator_for(tmp_path, tiny_gpt2))
    tuned = make_bot(admin, generator=generator_for(tmp_path, tiny_gpt2, "  adapter: adapters/tone\n"))
    try:
        # The relative path is the config file's folder's, like the other paths in the config.
        assert tuned.generator.adapter.path == tmp_path / "adapters" / "tone"
        assert plain.generator.adapter is None
        answers = {name: [bot.ask(text) for text in MESSAGES] for name, bot in (("plain", plain), ("tuned", tuned))}
        assert all(answers["tuned"]) and answers["tuned"] != answers["plain"]
        stats = tuned.ask("/stats")
        assert f"Adapter: {tmp_path / 'adapters' / 'tone'}" in stats, stats
        assert f"{CARD_STEPS} training steps" in stats and "held-out perplexity 31.25 -> 18.50" in stats, stats
        assert "Adapter" not in plain.ask("/stats")
    finally:
        plain.generator.close()
        tuned.generator.close()


# ------------------------------------------------------------------ what the generator does with a plain model


def test_follow_ups_reuse_the_cache_with_the_adapter(tmp_path, tiny_gpt2, gpt2_adapter):
    cached = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n")
    fresh = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n  kv_cache: false\n")
    try:
        replies, stats = converse(cached, MESSAGES)
        without, _ = converse(fresh, MESSAGES)
    finally:
        cached.close()
        fresh.close()
    assert replies == without and any(replies)
    for previous, turn in zip(stats, stats[1:]):
        assert turn.reused_tokens >= previous.prompt_tokens and turn.computed_tokens < turn.prompt_tokens


def test_replies_are_still_decoded_together(tmp_path, tiny_gpt2, gpt2_adapter):
    alone = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n  max_batch: 1\n  kv_cache: false\n")
    together = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n  max_batch: 8\n  kv_cache: false\n")
    try:
        expected, got = answer_all(alone, PROMPTS), answer_all(together, PROMPTS)
    finally:
        alone.close()
        together.close()
    assert together.batcher.max_batch == 8 and together.last_stats.batch_size > 1
    assert got == expected and len(set(got)) > 1


def test_int8_quantizes_the_merged_weights(tmp_path, tiny_gpt2, gpt2, gpt2_adapter):
    quantized = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n  quantize: int8\n")
    merged = fresh_copy(gpt2)
    lora.load_adapter(merged, gpt2_adapter)
    try:
        assert any(isinstance(module, Int8Linear) for module in quantized.model.modules())
        assert quantized.adapter is not None
        expected, got = logits(merged.model, gpt2.tokenizer), logits(quantized.model, gpt2.tokenizer)
        base = logits(gpt2.model, gpt2.tokenizer)
        error, adapter_effect = (got - expected).abs().max(), (base - expected).abs().max()
        assert 0 < error < 0.05 * expected.abs().max()  # int8 really, and close to the merged float weights
        assert error < adapter_effect / 4  # not the base's weights quantized
        assert asyncio.run(quantized.reply([], "hello there")) is not None
    finally:
        quantized.close()


def test_onnx_runtime_exports_the_merged_weights(tmp_path, tiny_gpt2, gpt2, gpt2_adapter, capfd):
    base_export = generator_for(tmp_path, tiny_gpt2, "  runtime: onnxruntime\n")
    base_export.close()
    capfd.readouterr()
    on_onnx = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n  runtime: onnxruntime\n")
    assert "exporting the model to ONNX" in capfd.readouterr().err  # the base's export is not reused
    on_torch = generator_for(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n")
    try:
        assert isinstance(on_onnx.model, OnnxCausalLM)
        exports = sorted(path.name for path in (tmp_path / "cache" / "onnx").iterdir())
        assert len(exports) == 2, exports
        assert onnx_runtime.fingerprint(on_torch.model) != onnx_runtime.fingerprint(gpt2.model)
        expected, got = answer_all(on_torch, PROMPTS), answer_all(on_onnx, PROMPTS)
        assert got == expected and on_onnx.last_stats.batch_size > 1
        assert got != answer_all_base(tmp_path, tiny_gpt2)
        history = [Turn("user", PROMPTS[1]), Turn("assistant", got[1])]
        assert asyncio.run(on_onnx.reply(history, "and then?")) == asyncio.run(on_torch.reply(history, "and then?"))
        assert on_onnx.last_stats.reused_tokens > 0
    finally:
        on_onnx.close()
        on_torch.close()


def answer_all_base(tmp_path: Path, model: Path) -> list[str]:
    generator = generator_for(tmp_path, model)
    try:
        return answer_all(generator, PROMPTS)
    finally:
        generator.close()


def test_the_merged_model_carries_the_adapters_identity_into_the_onnx_cache_key(gpt2, gpt2_adapter, tmp_path):
    # The cache key does not rest on the weights sampled for it alone: each adapter names its own export.
    other = make_adapter(gpt2.model, tmp_path / "other", gpt2.name, seed=2)
    first, second = fresh_copy(gpt2), fresh_copy(gpt2)
    lora.load_adapter(first, gpt2_adapter)
    lora.load_adapter(second, other)
    assert first.model.config.chatforge_adapter != second.model.config.chatforge_adapter
    assert len({onnx_runtime.fingerprint(m) for m in (gpt2.model, first.model, second.model)}) == 3


# ------------------------------------------------------------------ what is refused, and how


def config_error(tmp_path: Path, model: Path, adapter: str, lines: str = "") -> str:
    """The one issue a generator with `generator.adapter: adapter` is refused with, as the CLI prints it."""
    path = write_config(tmp_path, model, f"  adapter: {adapter}\n{lines}")
    with pytest.raises(ConfigError) as caught:
        create_generator(load_settings(path)).close()
    [issue] = caught.value.issues
    assert issue.path == "generator.adapter" and issue.line == 8, issue  # its own line in the file
    return str(caught.value)


def test_a_missing_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import chatforge.local.model_loading as model_loading

    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    message = config_error(tmp_path, Path("/no/such/model"), "adapters/missing")
    assert f"generator.adapter: no such folder: {tmp_path / 'adapters' / 'missing'}" in message


def test_a_folder_that_is_not_a_peft_adapter_is_refused(tmp_path, tiny_gpt2):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an adapter")
    message = config_error(tmp_path, tiny_gpt2, "notes")
    assert "is not a LoRA adapter (it has no adapter_config.json" in message, message
    file_instead = tmp_path / "adapter.safetensors"
    file_instead.write_bytes(b"\0" * 8)
    assert "is not a folder" in config_error(tmp_path, tiny_gpt2, str(file_instead))


def test_a_broken_adapter_config_or_card_is_refused(tmp_path, tiny_gpt2, gpt2_adapter):
    broken = shutil.copytree(gpt2_adapter, tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is not valid JSON" in config_error(tmp_path, tiny_gpt2, str(broken))
    bad_card = shutil.copytree(gpt2_adapter, tmp_path / "bad-card")
    (bad_card / "chatforge-adapter.json").write_text(json.dumps({"format": 1, "prompt": {}}))
    message = config_error(tmp_path, tiny_gpt2, str(bad_card))
    assert "chatforge-adapter.json" in message and "base" in message, message
    missing_weights = shutil.copytree(gpt2_adapter, tmp_path / "no-weights")
    (missing_weights / "adapter_model.safetensors").unlink()
    assert "has no adapter_model.safetensors" in config_error(tmp_path, tiny_gpt2, str(missing_weights))


def test_an_adapter_trained_on_another_base_is_refused(tmp_path, tiny_gpt2, gpt2):
    other = fresh_copy(gpt2)
    with torch.no_grad():
        for parameter in other.model.parameters():
            parameter.add_(0.01)
    folder = make_adapter(other.model, tmp_path / "other-base", "my-other-gpt2")
    message = config_error(tmp_path, tiny_gpt2, str(folder))
    assert (f"trained on my-other-gpt2 (weights fingerprint {weights_fingerprint(other.model)}), but "
            f"generator.model is {tiny_gpt2} (fingerprint {weights_fingerprint(gpt2.model)})") in message, message


def test_an_adapter_trained_on_the_same_base_in_another_folder_loads(tmp_path, tiny_gpt2, gpt2_adapter):
    moved = shutil.copytree(tiny_gpt2, tmp_path / "same-weights")
    generator = generator_for(tmp_path, moved, f"  adapter: {gpt2_adapter}\n")
    generator.close()


def test_an_adapter_trained_with_another_prompt_format_is_refused(gpt2, gpt2_adapter, tmp_path):
    from conftest import QWEN2_5_CHAT_TEMPLATE

    chat = fresh_copy(gpt2)
    chat.tokenizer = copy.deepcopy(gpt2.tokenizer)
    chat.tokenizer.chat_template = QWEN2_5_CHAT_TEMPLATE  # same weights, so only the prompt format differs
    with pytest.raises(lora.AdapterError, match=r"trained on User:/Bot: transcripts, but generator.model's "
                                                r"tokenizer has a chat template"):
        lora.load_adapter(chat, gpt2_adapter)
    chat_trained = make_adapter(gpt2.model, tmp_path / "chat", gpt2.name, chat_template=True)
    with pytest.raises(lora.AdapterError, match=r"trained with a chat template, but generator.model's tokenizer "
                                                r"has none"):
        lora.load_adapter(fresh_copy(gpt2), chat_trained)


def test_an_adapter_without_a_card_loads_with_a_warning(tmp_path, tiny_gpt2, gpt2, caplog):
    folder = make_adapter(gpt2.model, tmp_path / "from-elsewhere", gpt2.name, card=False)
    with caplog.at_level("WARNING", logger="chatforge.generator"):
        generator = generator_for(tmp_path, tiny_gpt2, f"  adapter: {folder}\n")
    generator.close()
    assert any("no chatforge-adapter.json" in record.getMessage() and "cannot be checked" in record.getMessage()
               for record in caplog.records), caplog.text
    assert generator.adapter.card is None and "no chatforge card" in generator.adapter.describe()


def test_an_adapter_for_another_architecture_is_a_message_not_a_traceback(tmp_path, tiny_gpt2, tiny_llama):
    folder = make_adapter(tiny_llama.model, tmp_path / "llama", tiny_llama.name, card=False)
    message = config_error(tmp_path, tiny_gpt2, str(folder))
    assert "does not fit generator.model" in message and "q_proj" in message, message
    assert "Traceback" not in message


def tiny_gpt2_variant(gpt2: LoadedModel, **changes):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = copy.deepcopy(gpt2.model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    return GPT2LMHeadModel(config).eval()


def test_an_adapter_of_other_shapes_is_a_message_not_a_traceback(tmp_path, tiny_gpt2, gpt2):
    wider = make_adapter(tiny_gpt2_variant(gpt2, n_embd=64), tmp_path / "wider", "wider", card=False)
    message = config_error(tmp_path, tiny_gpt2, str(wider))
    assert "does not fit generator.model" in message and "size mismatch" in message, message
    assert "[4, 64]" in message and "[4, 32]" in message, message
    deeper = make_adapter(tiny_gpt2_variant(gpt2, n_layer=4), tmp_path / "deeper", "deeper", card=False)
    message = config_error(tmp_path, tiny_gpt2, str(deeper))  # peft alone would drop layers 2 and 3 silently
    assert "does not fit generator.model" in message and "transformer.h.2.attn.c_attn" in message, message


def test_the_key_is_the_transformers_backends_only(tmp_path):
    settings = load_settings_from_dict({"generator": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                      "model": "m", "adapter": "adapters/tone"}})
    issues = PluginHost(settings).load()
    assert [(issue.path, issue.message.split(" (")[0]) for issue in issues] == [("generator.adapter", "unknown key")]
    with pytest.raises(ConfigError, match="generator.adapter: must not be empty"):
        load_settings_from_dict({"generator": {"adapter": ""}})


# ------------------------------------------------------------------ where the adapter is shown


def test_chatforge_plugins_shows_the_adapter(cli, tmp_path, tiny_gpt2, gpt2_adapter):
    config = write_config(tmp_path, tiny_gpt2, f"  adapter: {gpt2_adapter}\n")
    result = cli("plugins", "-c", str(config))
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("generator backends: transformers (chosen)\n", 1)[1].splitlines()[0]
    assert section == (f"  adapter:  {gpt2_adapter} (LoRA rank 4; {CARD_STEPS} training steps; "
                       "held-out perplexity 31.25 -> 18.50)"), result.stdout
    missing = write_config(tmp_path, tiny_gpt2, "  adapter: nowhere\n")
    result = cli("plugins", "-c", str(missing))
    assert f"  adapter:  cannot be served: no such folder: {tmp_path / 'nowhere'}\n" in result.stdout, result.stdout


def test_chatforge_chat_refuses_a_missing_adapter_without_a_traceback(cli, tmp_path, tiny_gpt2):
    config = write_config(tmp_path, tiny_gpt2, "  adapter: adapters/missing\n")
    result = cli("chat", "-c", str(config), stdin="hello\n", timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{config}:8: generator.adapter: no such folder: {tmp_path / 'adapters' / 'missing'}" in result.stderr
    assert "Traceback" not in result.stderr
