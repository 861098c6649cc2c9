"""ONNX Runtime as the generator's engine: the same model, exported once, decoding several times faster.

transformers runs a model op by op from Python. ONNX Runtime runs an exported
graph with fused CPU kernels, and its MatMulNBits kernel multiplies by 8-bit
weights (one scale per block of 128) with int8 arithmetic: that is what makes
`generator.runtime: onnxruntime` with `quantize: int8` fast. Block scales keep
the activations' outliers from hurting quality, unlike one int8 scale per
tensor (`quantize_dynamic`, which raised SmolLM2's perplexity by 63%).

The graph is exported once per model (torch.onnx's dynamo exporter) and kept
under `generator.cache_dir`/onnx, keyed by the model's config, a sample of its
weights and the library versions. It takes and returns the attention cache
explicitly (past keys and values in, present ones out), so `OnnxCausalLM`
looks like a transformers model with a DynamicCache to the generator:
batching, left padding and per-conversation cache reuse work unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import cache_keyword
from .model_loading import ModelLoadError, progress

log = logging.getLogger("chatforge.generator")

QUANTIZATIONS = ("none", "int8")
GRAPH_VERSION = 2
"""Bumped when the graph `build` makes changes (2: fused normalizations, grouped attention), so older exports
are made again."""
INT8_BLOCK = 128
"""Weights per int8 scale. On SmolLM2: 128 decodes 3.9x plain fp32 (perplexity +1.3%), 64 3.5x (+1.5%),
32 3.4x (+0.15%); 128 is the fastest that keeps perplexity within 2%."""


class OnnxUnavailable(RuntimeError):
    """onnxruntime (or the exporter's onnx and onnxscript) is not installed."""


def require() -> None:
    """Fail early, naming the install command, if the runtime or the exporter is missing."""
    missing = [name for name in ("onnxruntime", "onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise OnnxUnavailable(f"needs {', '.join(missing)}: pip install 'chatforge[onnx]'")


def load(model: Any, cache_dir: Path, quantize: str = "none", threads: int = 1) -> OnnxCausalLM:
    """The ONNX Runtime version of a loaded transformers model, exported (and quantized) on first use."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"onnxruntime supports quantize {' or '.join(QUANTIZATIONS)}, not {quantize!r}")
    require()
    folder = Path(cache_dir).expanduser() / "onnx" / f"{_slug(model)}-{fingerprint(model)}"
    graph = folder / ("int8" if quantize == "int8" else "fp32") / "model.onnx"
    if not graph.is_file():
        with progress(f"exporting the model to ONNX{' and quantizing it to int8' if quantize == 'int8' else ''}"
                      f" in {folder} (first start only)"):
            try:
                build(model, graph, quantize)
            except Exception as exc:  # noqa: BLE001 - an architecture the exporter cannot trace, a full disk...
                log.debug("ONNX export failed", exc_info=True)
                raise ModelLoadError(f"generator.runtime: onnxruntime: could not export {_slug(model)} to ONNX "
                                     f"({type(exc).__name__}: {exc}); runtime: torch runs it as it is") from None
    onnx_model = OnnxCausalLM(graph, model.config, model.generation_config, threads)
    log.info("model numerics: ONNX Runtime, %s weights, from %s", "int8" if quantize == "int8" else "float32", graph)
    return onnx_model


def build(model: Any, target: Path, quantize: str) -> None:
    """Export `model` to `target` (a model.onnx beside its .data file), quantized if asked; atomically."""
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".building-") as scratch:
        scratch = Path(scratch)
        exported = scratch / "exported" / "model.onnx"
        export(model, exported)
        fused = scratch / "fused" / "model.onnx"
        fuse_norms(exported, fused)
        result = scratch / "result" / "model.onnx"
        if quantize == "int8":
            folded = scratch / "folded" / "model.onnx"
            fold_weights(fused, folded)
            quantize_int8(folded, result)
        else:
            fused.parent.rename(result.parent)
        shutil.rmtree(target.parent, ignore_errors=True)
        result.parent.rename(target.parent)


def export(model: Any, target: Path) -> None:
    """torch.onnx (dynamo) export with flat past/present keys and values and only the last position's logits."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = kv_shape(model.config)
    keyword = cache_keyword(model)
    _register_grouped_attention()

    class ExplicitCache(torch.nn.Module):
        def __init__(self, wrapped: Any) -> None:
            super().__init__()
            self.wrapped = wrapped

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: tuple) -> tuple:
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=self.wrapped.config)
            output = self.wrapped(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=True, logits_to_keep=1, **{keyword: cache})
            present = []
            for layer in cache.layers:
                present += [layer.keys, layer.values]
            return (output.logits, *present)

    # Traced with batch 2, 7 cached and 5 new tokens (all > 1, so no size is fixed); a 0-long past works too.
    batch, new, cached = 2, 5, 7
    example = (
        torch.randint(0, 100, (batch, new)),
        torch.ones(batch, cached + new, dtype=torch.long),
        torch.arange(cached, cached + new).unsqueeze(0).expand(batch, new),
        tuple(torch.randn(batch, kv_heads, cached, head_dim) for _ in range(2 * layers)),
    )
    dynamic = torch.export.Dim.DYNAMIC
    shapes = ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic},
              tuple({0: dynamic, 2: dynamic} for _ in range(2 * layers)))
    names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    target.parent.mkdir(parents=True, exist_ok=True)
    heads = getattr(model.config, "num_attention_heads", None) or model.config.n_head
    # Plain MatMul/Softmax: ~10% faster under ORT than SDPA's; grouped when keys and values are shared.
    grouped = kv_heads < heads and getattr(model.config, "model_type", "") in GROUPED_MODEL_TYPES
    implementation = GROUPED_ATTENTION if grouped else "eager"
    with torch.no_grad(), _attention(model, implementation):
        torch.onnx.export(
            ExplicitCache(model).eval(), example, str(target),
            input_names=["input_ids", "attention_mask", "position_ids"] + [f"past.{name}" for name in names],
            output_names=["logits"] + [f"present.{name}" for name in names],
            dynamic_shapes=shapes, dynamo=True, external_data=True, optimize=True, verbose=False,
        )


GROUPED_ATTENTION = "chatforge_grouped"
GROUPED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Models whose eager attention is exactly matmul, mask, softmax, matmul; others (Gemma's soft-capping,
gpt-oss's attention sinks) keep their own eager attention."""


def grouped_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float,
                      dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """transformers' eager attention without copying the shared keys and values once per query head.

    With grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads) eager attention expands
    the cache to one copy per query head every step; here each key/value head's queries are stacked and
    multiplied by the cache as it is. The same arithmetic, so the same logits.
    """
    batch, heads, length, size = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    weights = torch.matmul(query.reshape(batch, kv_heads, groups * length, size), key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = (weights.view(batch, kv_heads, groups, length, -1) + attention_mask.unsqueeze(2)
                   ).view(batch, kv_heads, groups * length, -1)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).view(batch, heads, length, size)
    return output.transpose(1, 2).contiguous(), None


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)


def fuse_norms(source: Path, target: Path) -> None:
    """Each RMSNorm, and each residual Add followed by one, as one of ONNX Runtime's fused kernels.

    The exporter writes an RMSNorm as six small ops (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul); at batch 1
    each op costs more in dispatch than in arithmetic, so on SmolLM2 (121 norms) the fused graph decodes
    about 10% faster. onnxscript's own ONNX Runtime rewrite rules do it; GPT-2's LayerNorm is left to
    ONNX Runtime, which fuses it itself.
    """
    import onnx_ir

    try:  # not in onnxscript's __all__: if a release moves them, export unfused (slower, still right)
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization
    except ImportError as exc:
        log.warning("exporting without fused normalizations (about 10%% slower): %s", exc)
        shutil.copytree(source.parent, target.parent)
        return
    graph = onnx_ir.load(str(source))
    fused = fuse_rms_normalization(graph) + fuse_skip_rms_normalization(graph)
    log.debug("fused %d normalizations", fused)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx_ir.save(graph, str(target), external_data=f"{target.name}.data")


def fold_weights(source: Path, target: Path) -> None:
    """Make every weight a constant input of a MatMul, which is what the int8 quantizer looks for.

    The exporter writes Linear layers as Gemm (weight transposed) and a tied
    LM head as Transpose(embedding) followed by MatMul: both become a MatMul
    with a transposed copy of the weight (plus an Add for a bias).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {initializer.name: initializer for initializer in graph.initializer}

    def transposed(name: str, new_name: str) -> str:
        copy = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weights[name]).T), new_name)
        graph.initializer.append(copy)
        weights[new_name] = copy
        return new_name

    nodes = []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in weights and not attributes.get("transA", 0)
                and attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0):
            weight = node.input[1]
            if attributes.get("transB", 0):
                weight = transposed(weight, f"{weight}_T")
            has_bias = len(node.input) > 2 and bool(node.input[2])
            product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul"))
            if has_bias:
                nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        elif node.op_type == "Transpose" and node.input[0] in weights and len(weights[node.input[0]].dims) == 2:
            transposed(node.input[0], node.output[0])  # the node's output becomes a constant
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target), save_as_external_data=True, location=f"{target.name}.data", size_threshold=1024)


def quantize_int8(source: Path, target: Path) -> None:
    """Every constant-weight MatMul -> MatMulNBits: 8-bit symmetric weights in blocks, int8 arithmetic."""
    import onnx

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # Importing this module calls logging.basicConfig(level=INFO): undo that, or every library's INFO line shows.
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    for handler in [handler for handler in root.handlers if handler not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    settings = {"block_size": INT8_BLOCK, "is_symmetric": True, "accuracy_level": 4}
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=8, **settings,
                                     algo_config=DefaultWeightOnlyQuantConfig(bits=8, **settings))
    quantizer.process()
    target.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=True)


@contextlib.contextmanager
def _attention(model: Any, implementation: str):
    """Export with this attention implementation, then give the model back as it was."""
    original = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation(implementation)
    except Exception as exc:  # noqa: BLE001 - keep the model's own attention
        log.debug("exporting with the model's own attention implementation: %s", exc)
        original = None
    try:
        yield
    finally:
        if original is not None:
            model.set_attn_implementation(original)


@contextlib.contextmanager
def _quiet():
    """Keep the exporter's progress lines off stdout (the console's replies go there) and its chatter out."""
    noisy = [logging.getLogger(name) for name in
             ("torch.onnx", "onnxscript", "onnx_ir", "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


@dataclass
class _Output:
    logits: torch.Tensor
    past_key_values: Any


class OnnxCausalLM:
    """An ONNX Runtime session that the generator can drive like a transformers causal LM."""

    def __init__(self, graph: Path, config: Any, generation_config: Any, threads: int = 1) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.generation_config = generation_config
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.name_or_path = str(graph)
        self.layers, self.kv_heads, self.head_dim = kv_shape(config)

    def __call__(self, **inputs: Any) -> _Output:
        return self.forward(**inputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: Any = None, use_cache: bool = True, logits_to_keep: int = 1) -> _Output:
        """Run the new tokens; the cache (a DynamicCache) is updated in place and returned with the logits.

        Only the last position's logits are computed (the generator needs no others).
        """
        from transformers import DynamicCache

        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
        rows = input_ids.shape[0]
        empty = np.zeros((rows, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        feeds = {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "position_ids": position_ids.numpy(),
        }
        for index, layer in enumerate(cache.layers):
            started = layer.is_initialized and layer.keys.numel() > 0
            feeds[f"past.{index}.key"] = np.ascontiguousarray(layer.keys.numpy()) if started else empty
            feeds[f"past.{index}.value"] = np.ascontiguousarray(layer.values.numpy()) if started else empty
        logits, *present = self.session.run(None, feeds)
        for index, layer in enumerate(cache.layers):
            keys, values = torch.from_numpy(present[2 * index]), torch.from_numpy(present[2 * index + 1])
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return _Output(torch.from_numpy(logits), cache)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder config: GPT-2's names or Llama's."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def fingerprint(model: Any) -> str:
    """Which export fits this model: its config, a sample of every weight, the libraries (the exporter's
    rewrite rules shape the graph), the int8 block, the graph's version."""
    import onnxruntime
    import onnxscript
    import transformers

    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(f"{torch.__version__} {transformers.__version__} {onnxruntime.__version__} {INT8_BLOCK}"
                  f" {GRAPH_VERSION} {onnxscript.__version__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:64].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _slug(model: Any) -> str:
    name = Path(str(getattr(model, "name_or_path", "") or "model")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
