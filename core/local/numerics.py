"""Where the model runs and in what precision: device, dtype and int8 weights.

Decoding one token at a time is bound by reading every weight from memory,
so smaller weights decode faster: bfloat16 halves them, int8 quarters them.

Two int8 schemes, both for the CPU, for `nn.Linear` layers and GPT-2's
transformers `Conv1D` layers (the same maths with the weight stored
transposed):

- `int8`: int8 weights with one scale per output row; activations stay
  floating point (bfloat16 inside the matmul). On SmolLM2 this keeps
  perplexity within 0.1% of float32 and decodes ~2.2-2.4x faster.
- `int8-dynamic`: `torch.ao.quantization.quantize_dynamic`, which also rounds
  each layer's input to 8 bits. ~2.8x faster, but outliers in the inputs of
  Llama-style MLP down-projections make that lossy: SmolLM2's perplexity
  goes from 27 to 82.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch
from torch import nn

log = logging.getLogger("chatforge.generator")

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int8-dynamic")


class DeviceUnavailable(ValueError):
    """The configured device (or its dtype) is not usable on this machine."""


def resolve_device(device: str, dtype: str = "float32") -> str:
    """`cpu` or `cuda`; `auto` is cuda when torch sees a GPU. Cheap: check it before a slow model load."""
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"{device}: must be cpu, cuda or auto")
    if device == "cuda" and not has_cuda:
        raise DeviceUnavailable("cuda: torch sees no CUDA GPU here (use cpu or auto)")
    if device == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable("cuda: this GPU does not support bfloat16 (use float16)")
    return device


def prepare_model(model: Any, device: str = "cpu", dtype: str = "float32", quantize: str = "none") -> Any:
    """Move and cast `model`, and quantize its Linear layers if asked; logs one INFO line.

    Works in place and returns the model. Quantizing needs the CPU and float32
    (the layers around the int8 ones stay float32). An LM head tied to the input
    embedding gets its own int8 copy of the weight; the embedding keeps the
    float weight, so token lookup is unchanged.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    started = time.perf_counter()
    target = resolve_device(device, dtype)
    if quantize != "none" and (target != "cpu" or dtype != "float32"):
        raise ValueError(f"quantize {quantize} needs device cpu and dtype float32")
    model = model.to(device=target, dtype=getattr(torch, dtype))
    done = f"{dtype} on {target}"
    if quantize == "int8":
        # Straight from each layer's float weight, no float copy on the way: peak memory stays near fp32's.
        from transformers.pytorch_utils import Conv1D

        swapped = replace_linears(model, Int8Linear.from_conv1d, kind=Conv1D)
        linears = replace_linears(model, Int8Linear.from_linear) + swapped
        done = f"int8 weights in {linears} Linear layers" + (f" ({swapped} of them Conv1D)" if swapped else "")
    elif quantize == "int8-dynamic":
        swapped = conv1d_to_linear(model)
        linears = sum(isinstance(module, nn.Linear) for module in model.modules())
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated (for torchao), still works
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        done = f"dynamic int8 quantization of {linears} Linear layers"
        done += f" ({swapped} converted from Conv1D)" if swapped else ""
    if quantize != "none":
        done += ", float32 elsewhere, on cpu"
    model.eval()
    log.info("model numerics: %s, prepared in %.2f s", done, time.perf_counter() - started)
    return model


class Int8Linear(nn.Module):
    """A Linear with int8 weights (one scale per output row) and floating-point activations.

    `torch._weight_int8pack_mm` multiplies bfloat16 activations by the int8
    weight directly, reading a quarter of the float32 bytes; with float32
    activations the same kernel is ~25x slower, hence the round trip.
    """

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_conv1d(cls, conv: Any) -> Int8Linear:
        """From transformers' Conv1D (GPT-2), whose weight is stored [in, out]: the same maths as a Linear."""
        return cls.from_weight(conv.weight.t(), conv.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rows_at_once: int = 4096) -> Int8Linear:
        """Quantize a [out, in] weight a block of rows at a time, so no whole-matrix temporaries are made."""
        weight = weight.detach()
        weight_int8 = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(weight.shape[0], dtype=torch.float32)
        for first in range(0, weight.shape[0], rows_at_once):
            block = weight[first:first + rows_at_once].float()
            block_scales = (block.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            weight_int8[first:first + rows_at_once] = torch.round(block / block_scales[:, None]).clamp(-127, 127)
            scales[first:first + rows_at_once] = block_scales
        bias = None if bias is None else bias.detach().clone()
        return cls(weight_int8, scales.to(torch.bfloat16), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` by the equivalent `nn.Linear`, in place; return how many.

    Conv1D computes `x @ W + b` with W stored [in, out]; Linear stores it [out, in].
    """
    from transformers.pytorch_utils import Conv1D

    def to_linear(conv: Conv1D) -> nn.Linear:
        weight = conv.weight
        linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        return linear.train(conv.training)

    return replace_linears(model, to_linear, kind=Conv1D)


def replace_linears(model: nn.Module, make: Any, kind: type = nn.Linear) -> int:
    """Replace each submodule of type `kind` by `make(submodule)`, in place; return how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced
