"""Compatibility alias: `chatforge.model_loading` is `chatforge.local.model_loading`, for code written before the move."""

import sys

from .local import model_loading as _module

sys.modules[__name__] = _module
