"""Would a second ONNX graph, quantized for fast prompts, shorten the first token? Speed and the quality cost.

chatforge's `runtime: onnxruntime` graph multiplies by int8 weights with MatMulNBits, which keeps the
activations' outliers (one scale per block of 128 inputs) but is compute-bound on a long prompt. ONNX
Runtime's `quantize_dynamic` (int8 weights per channel, activations with one scale per tensor) uses its
faster int8 GEMM. This bench builds both from the embedded SmolLM2, and measures, in the same run:

  prefill ms     one `session.run` of a 302-token prompt (best of --rounds, graphs interleaved), and the
                 ratio against MatMulNBits
  perplexity     of the held-out text's tokens after its first --split tokens, those prefilled by the graph
                 and the rest decoded one at a time by MatMulNBits (as a prefill graph would be used),
                 against float32 transformers on the same tokens
  logits diff    the largest difference from float32's logits at the prefill's last position

Variants: MatMulNBits alone; dynamic everywhere; dynamic but the MLP down-projections (whose inputs
carry the largest outliers) kept in MatMulNBits; dynamic everywhere after SmoothQuant (Xiao et al., 2023:
each input channel's outliers divided out of the activations and multiplied into the weights, folded into
the RMSNorm and up-projection weights before which they stand, so the model computes the same function),
calibrated on this repository's README, with `reduce_range` (7-bit weights: on CPUs without VNNI, AVX2's
8-bit multiply-add saturates, which on its own raises perplexity more than tenfold).

    .venv/bin/python bench/prefill_graphs.py [--threads 1] [--rounds 4] [--split 164]

About 5-10 minutes (the graphs are built once, under ~/.cache/chatforge/bench/prefill-graphs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from copy import deepcopy
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chatforge.local import onnx_runtime  # noqa: E402
from chatforge.local.model_loading import embedded_gguf_file, load_gguf  # noqa: E402

CACHE = Path.home() / ".cache" / "chatforge"
SMOOTHING = 0.75
"""SmoothQuant's alpha: how much of each channel's outlier moves into the weights (0.5 measured worse)."""


def input_maxima(model, texts: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Each Linear layer's largest absolute input per channel, over `texts` (SmoothQuant's calibration)."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args) -> None:
            channels = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], channels) if name in maxima else channels
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            for text in texts:
                model(tokenizer(text, return_tensors="pt").input_ids[:, :512])
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def smoothed(model, maxima: dict[str, torch.Tensor], alpha: float):
    """A copy of a Llama-shaped model with SmoothQuant's per-channel scales folded in: same function."""
    copy = deepcopy(model)

    def scales(key: str, weights: list[torch.Tensor]) -> torch.Tensor:
        largest_weight = torch.cat([w.abs() for w in weights]).amax(0).clamp(min=1e-5)
        return (maxima[key].clamp(min=1e-5).pow(alpha) / largest_weight.pow(1 - alpha)).clamp(min=1e-5)

    with torch.no_grad():
        for index, layer in enumerate(copy.model.layers):
            prefix, attention, mlp = f"model.layers.{index}.", layer.self_attn, layer.mlp
            for norm, linears, key in ((layer.input_layernorm, [attention.q_proj, attention.k_proj,
                                                                attention.v_proj], "self_attn.q_proj"),
                                       (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj")):
                scale = scales(prefix + key, [linear.weight for linear in linears])
                norm.weight.div_(scale)
                for linear in linears:
                    linear.weight.mul_(scale)
            scale = scales(prefix + "mlp.down_proj", [mlp.down_proj.weight])
            mlp.up_proj.weight.div_(scale[:, None])
            mlp.down_proj.weight.mul_(scale)
    return copy


def folded_graph(model, folder: Path) -> Path:
    folded = folder / "folded" / "model.onnx"
    if not folded.is_file():
        exported, fused = folder / "exported" / "model.onnx", folder / "fused" / "model.onnx"
        onnx_runtime.export(model, exported)
        onnx_runtime.fuse_norms(exported, fused)
        onnx_runtime.fold_weights(fused, folded)
    return folded


def build(model, tokenizer, folder: Path) -> dict[str, Path]:
    """The folded float32 graph quantized three ways, and the smoothed one a fourth (made once)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded = folded_graph(model, folder)
    layers = model.config.num_hidden_layers
    # The folded graph's weight MatMuls are node_linear, node_linear_1, ...: seven a layer, the down-projection last.
    down = [f"node_linear_{7 * layer + 6}" for layer in range(layers)]
    graphs = {"MatMulNBits int8": folder / "matmulnbits" / "model.onnx",
              "dynamic everywhere": folder / "dynamic" / "model.onnx",
              "dynamic, down-proj MatMulNBits": folder / "dynamic-but-down" / "model.onnx"}
    for target, exclude in zip(graphs.values(), (None, [], down)):
        if target.is_file():
            continue
        source = folded
        if exclude is not None:
            source = target.parent.parent / f"{target.parent.name}-dynamic" / "model.onnx"
            source.parent.mkdir(parents=True, exist_ok=True)
            quantize_dynamic(str(folded), str(source), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_exclude=exclude, use_external_data_format=True)
        onnx_runtime.quantize_int8(source, target)  # whatever MatMul is left -> MatMulNBits
    name = f"dynamic, SmoothQuant {SMOOTHING}"
    graphs[name] = folder / f"smoothquant-{SMOOTHING}" / "model.onnx"
    if not graphs[name].is_file():
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        texts = [readme[start:start + 3000] for start in range(0, min(len(readme), 30000), 3000)]
        smooth_folded = folded_graph(smoothed(model, input_maxima(model, texts, tokenizer), SMOOTHING),
                                     folder / f"smoothquant-{SMOOTHING}-float32")
        dynamic = folder / f"smoothquant-{SMOOTHING}-dynamic" / "model.onnx"
        dynamic.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(smooth_folded), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, use_external_data_format=True)
        onnx_runtime.quantize_int8(dynamic, graphs[name])
    return graphs


def prefill_ms(sessions: dict, config, rounds: int) -> dict[str, float]:
    layers, kv_heads, head_dim = onnx_runtime.kv_shape(config)
    length = 302
    feeds = {"input_ids": np.random.default_rng(0).integers(100, 40000, (1, length)),
             "attention_mask": np.ones((1, length), np.int64), "position_ids": np.arange(length)[None]}
    for index in range(layers):
        for kind in ("key", "value"):
            feeds[f"past.{index}.{kind}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    best = {name: float("inf") for name in sessions}
    for _ in range(rounds):
        for name, model in sessions.items():
            started = time.perf_counter()
            model.session.run(None, feeds)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: seconds * 1000 for name, seconds in best.items()}


def split_quality(prefill, decode, reference_logits, ids: list[int], split: int) -> tuple[float, float]:
    """Perplexity of ids[split:] with ids[:split] prefilled by `prefill` and the rest decoded by `decode`."""
    from transformers import DynamicCache

    with torch.inference_mode():
        output = prefill(input_ids=torch.tensor([ids[:split]]), attention_mask=torch.ones(1, split, dtype=torch.long),
                         position_ids=torch.arange(split)[None], past_key_values=DynamicCache(config=prefill.config))
        rows, cache = [output.logits[0, -1]], output.past_key_values
        for position in range(split, len(ids) - 1):
            output = decode(input_ids=torch.tensor([[ids[position]]]),
                            attention_mask=torch.ones(1, position + 1, dtype=torch.long),
                            position_ids=torch.tensor([[position]]), past_key_values=cache)
            cache = output.past_key_values
            rows.append(output.logits[0, -1])
    loss = torch.nn.functional.cross_entropy(torch.stack(rows), torch.tensor(ids[split:]))
    return math.exp(loss.item()), (rows[0] - reference_logits[split - 1]).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--split", type=int, default=164)
    args = parser.parse_args()
    from test_numerics import HELD_OUT_TEXT

    if embedded_gguf_file() is None:
        sys.exit("needs the embedded SmolLM2: make setup installs it")
    torch.set_num_threads(args.threads)
    loaded = load_gguf(embedded_gguf_file(), CACHE)
    model, tokenizer = loaded.model, loaded.tokenizer
    graphs = build(model, tokenizer, CACHE / "bench" / "prefill-graphs")
    sessions = {name: onnx_runtime.OnnxCausalLM(path, model.config, model.generation_config, args.threads)
                for name, path in graphs.items()}
    times = prefill_ms(sessions, model.config, args.rounds)
    ids = tokenizer(HELD_OUT_TEXT).input_ids
    with torch.inference_mode():
        reference_logits = model(torch.tensor([ids])).logits[0]
    reference = math.exp(torch.nn.functional.cross_entropy(reference_logits[args.split - 1:-1],
                                                            torch.tensor(ids[args.split:])).item())
    baseline = times["MatMulNBits int8"]
    print(f"\nSmolLM2, {args.threads} thread(s): 302-token prefill (best of {args.rounds}); perplexity of the "
          f"held-out text after its first {args.split} tokens, float32 {reference:.3f}")
    print(f"{'prefill graph':32} {'prefill ms':>10} {'x MatMulNBits':>14} {'perplexity':>11} {'logits diff':>12}")
    for name, onnx_model in sessions.items():
        ppl, diff = split_quality(onnx_model, sessions["MatMulNBits int8"], reference_logits, ids, args.split)
        print(f"{name:32} {times[name]:10.0f} {baseline / times[name]:13.2f}x {(ppl / reference - 1) * 100:+10.2f}%"
              f" {diff:12.2f}")


if __name__ == "__main__":
    main()
