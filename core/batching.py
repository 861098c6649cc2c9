"""Compatibility alias: `chatforge.batching` is `chatforge.local.batching`, for code written before the move."""

import sys

from .local import batching as _module

sys.modules[__name__] = _module
