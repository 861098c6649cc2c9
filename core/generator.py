"""Compatibility alias: `chatforge.generator` is `chatforge.local.generator`, for code written before the move."""

import sys

from .local import generator as _module

sys.modules[__name__] = _module
