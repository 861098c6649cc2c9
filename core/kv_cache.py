"""Compatibility alias: `chatforge.kv_cache` is `chatforge.local.kv_cache`, for code written before the move."""

import sys

from .local import kv_cache as _module

sys.modules[__name__] = _module
