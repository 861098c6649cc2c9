"""generator.runtime: onnxruntime, on tiny GPT-2 and Llama models built in the tests.

The exported float32 graph must compute what transformers computes (same
logits, so the same greedy replies, batched or not, with the conversation's
cache reused); int8 must stay close. Quality on the real SmolLM2 is checked in
test_numerics.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from chatforge.local import onnx_runtime
from chatforge.app import create_generator
from chatforge.config import ConfigError, GeneratorConfig, load_settings
from chatforge.local.generator import TransformersGenerator
from chatforge.memory import Turn
from chatforge.local.model_loading import LoadedModel, load_model
from chatforge.local.onnx_runtime import OnnxCausalLM

PROMPTS = [f"conversation {i}: " + "tell me about the sea " * (i * 2) for i in range(5)]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2, model_cache):
    return load_model(str(tiny_gpt2), model_cache)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Where this module's exports are kept (shared, so each model is exported once per variant)."""
    return tmp_path_factory.mktemp("onnx-exports")


def forward_both(torch_model, onnx_model, ids: torch.Tensor, follow: torch.Tensor):
    """Last-position logits of a prompt, then of one more token through each one's cache."""
    from transformers import DynamicCache

    length = ids.shape[1]
    with torch.inference_mode():
        reference = torch_model(input_ids=ids, use_cache=True)
        cache = getattr(reference, "cache", None) or reference.past_key_values
        reference_next = torch_model(input_ids=follow, use_cache=True, cache=cache)
        ours = onnx_model(input_ids=ids, attention_mask=torch.ones(1, length, dtype=torch.long),
                          position_ids=torch.arange(length)[None], past_key_values=DynamicCache(config=onnx_model.config))
        ours_next = onnx_model(input_ids=follow, attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                               position_ids=torch.tensor([[length]]), past_key_values=ours.past_key_values)
    return (reference.logits[0, -1], ours.logits[0, -1]), (reference_next.logits[0, -1], ours_next.logits[0, -1])


@pytest.mark.parametrize("model", ["gpt2", "tiny_llama"])
def test_the_float32_graph_computes_what_transformers_computes(model, request, exports):
    loaded = request.getfixturevalue(model)
    onnx_model = onnx_runtime.load(loaded.model, exports)
    ids = torch.tensor([loaded.tokenizer("hello there, how are you today?").input_ids])
    for expected, got in forward_both(loaded.model, onnx_model, ids, torch.tensor([[7]])):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("model", ["gpt2", "tiny_llama"])
def test_int8_weights_stay_close(model, request, exports):
    loaded = request.getfixturevalue(model)
    onnx_model = onnx_runtime.load(loaded.model, exports, quantize="int8")
    ids = torch.tensor([loaded.tokenizer("hello there, how are you today?").input_ids])
    for expected, got in forward_both(loaded.model, onnx_model, ids, torch.tensor([[7]])):
        scale = expected.abs().max()
        assert 0 < (got - expected).abs().max() < 0.05 * scale  # int8 really, and close


def test_the_llama_graph_fuses_its_norms_and_reads_shared_keys_once(tiny_llama, exports):
    """What makes the graph fast at batch 1, checked on the graph itself: a transformers change that broke
    either pattern would leave the logits right and quietly cost about a fifth of the decoding speed."""
    import collections

    import onnx

    onnx_model = onnx_runtime.load(tiny_llama.model, exports)
    graph = onnx.load(onnx_model.name_or_path, load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    layers = tiny_llama.model.config.num_hidden_layers
    assert tiny_llama.model.config.num_key_value_heads < tiny_llama.model.config.num_attention_heads  # grouped
    # Two norms a layer and the final one, each one kernel (the residual Add folded into the Skip ones).
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1, ops
    assert "Pow" not in ops and "ReduceMean" not in ops, ops
    # Eager attention expands each layer's keys and values (the present.* outputs) to every query head.
    made_by = {output: node for node in graph.node for output in node.output}

    def comes_from_the_cache(name: str) -> bool:
        for _ in range(4):  # present -> Unsqueeze -> Expand, give or take a Reshape
            if name.startswith("present."):
                return True
            node = made_by.get(name)
            if node is None or node.op_type not in ("Unsqueeze", "Reshape", "Identity"):
                return False
            name = node.input[0]
        return False

    expanded = [node.name for node in graph.node if node.op_type == "Expand" and comes_from_the_cache(node.input[0])]
    assert not expanded, expanded


def generator_on(loaded, runtime_model, **settings) -> TransformersGenerator:
    config = GeneratorConfig(**{"temperature": 0, "max_new_tokens": 16, "stop": ["never-appears"], **settings})
    return TransformersGenerator(LoadedModel(runtime_model, loaded.tokenizer, loaded.name), config)


@pytest.mark.parametrize("model", ["gpt2", "tiny_llama"])  # tiny_llama: grouped attention, left padding
def test_replies_batched_and_follow_ups_match_torch(model, request, exports):
    loaded = request.getfixturevalue(model)
    onnx_model = onnx_runtime.load(loaded.model, exports)
    on_torch, on_onnx = generator_on(loaded, loaded.model), generator_on(loaded, onnx_model)

    async def crowd(generator):
        return await asyncio.gather(*(generator.reply([], text) for text in PROMPTS))

    expected, got = asyncio.run(crowd(on_torch)), asyncio.run(crowd(on_onnx))
    assert got == expected and on_onnx.last_stats.batch_size > 1
    history = [Turn("user", PROMPTS[1]), Turn("assistant", got[1])]
    follow_expected = asyncio.run(on_torch.reply(history, "and then?"))
    follow_got = asyncio.run(on_onnx.reply(history, "and then?"))
    on_torch.close()
    on_onnx.close()
    assert follow_got == follow_expected
    assert on_onnx.last_stats.reused_tokens > 0  # the conversation's cache came back from the pool


def test_the_export_is_made_once_and_follows_the_weights(gpt2, tmp_path, capfd):
    first = onnx_runtime.load(gpt2.model, tmp_path)
    assert "exporting the model to ONNX" in capfd.readouterr().err
    again = onnx_runtime.load(gpt2.model, tmp_path)
    assert "exporting" not in capfd.readouterr().err and again.name_or_path == first.name_or_path
    changed = load_model(gpt2.name, tmp_path / "copy")
    with torch.no_grad():
        next(changed.model.parameters()).add_(1.0)
    assert onnx_runtime.fingerprint(changed.model) != onnx_runtime.fingerprint(gpt2.model)
    assert list(tmp_path.joinpath("onnx").iterdir()) == [first_folder(first)]  # nothing half-built left behind


def first_folder(onnx_model: OnnxCausalLM):
    from pathlib import Path

    return Path(onnx_model.name_or_path).parent.parent


def write_config(tmp_path, model, generator_lines: str):
    path = tmp_path / "config.yaml"
    path.write_text(f"generator:\n  model: {model}\n  cache_dir: {tmp_path / 'cache'}\n{generator_lines}"
                    "memory:\n  backend: memory\n")
    return path


def test_the_config_switches_the_runtime(tmp_path, tiny_gpt2):
    settings = load_settings(write_config(tmp_path, tiny_gpt2, "  runtime: onnxruntime\n  quantize: int8\n"))
    generator = create_generator(settings)
    try:
        assert isinstance(generator.model, OnnxCausalLM) and "int8" in generator.model.name_or_path
        assert asyncio.run(generator.reply([], "hello there")) is not None
    finally:
        generator.close()


@pytest.mark.parametrize("lines, words", [
    ("  device: cuda\n  runtime: onnxruntime\n", 'unless generator.device is "cpu"'),
    ("  dtype: bfloat16\n  runtime: onnxruntime\n", 'generator.dtype is "float32"'),
    ("  quantize: int8-dynamic\n  runtime: onnxruntime\n", 'for quantize "int8-dynamic"'),
    ("  runtime: tensorrt\n", "'torch' or 'onnxruntime'"),
])
def test_impossible_runtime_settings_are_config_errors(tmp_path, lines, words):
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, "gpt2", lines))
    [issue] = caught.value.issues
    assert issue.path == "generator.runtime" and words in issue.message


def test_a_missing_runtime_is_named_with_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime, "_importable", lambda name: name != "onnxruntime")
    settings = load_settings(write_config(tmp_path, "/no/such/model", "  runtime: onnxruntime\n"))
    with pytest.raises(ConfigError, match=r"generator.runtime: onnxruntime needs onnxruntime: "
                                          r"pip install 'chatforge\[onnx\]'"):
        create_generator(settings)


@pytest.mark.parametrize("model", ["gpt2", "tiny_llama"])
def test_exporting_leaves_the_torch_model_as_it_was(model, request, tmp_path):
    loaded = request.getfixturevalue(model)
    before = loaded.model.config._attn_implementation
    onnx_runtime.load(loaded.model, tmp_path)
    assert loaded.model.config._attn_implementation == before


def test_a_model_that_cannot_be_exported_is_a_clear_error_leaving_nothing_behind(gpt2, tmp_path, monkeypatch):
    from chatforge.local.model_loading import ModelLoadError

    def export_fails(model, target):
        target.parent.mkdir(parents=True)
        target.write_text("half written")
        raise RuntimeError("this architecture cannot be traced")

    monkeypatch.setattr(onnx_runtime, "export", export_fails)
    with pytest.raises(ModelLoadError, match=r"generator.runtime: onnxruntime: could not export .* "
                                             r"\(RuntimeError: this architecture cannot be traced\); runtime: torch"):
        onnx_runtime.load(gpt2.model, tmp_path)
    assert [path.name for path in (tmp_path / "onnx").rglob("*")] == [first_folder_name(gpt2)]


def first_folder_name(loaded) -> str:
    return f"{onnx_runtime._slug(loaded.model)}-{onnx_runtime.fingerprint(loaded.model)}"
