"""Compatibility alias: `chatforge.onnx_runtime` is `chatforge.local.onnx_runtime`, for code written before the move."""

import sys

from .local import onnx_runtime as _module

sys.modules[__name__] = _module
