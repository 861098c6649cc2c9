"""Compatibility alias: `chatforge.prompt` is `chatforge.local.prompt`, for code written before the move."""

import sys

from .local import prompt as _module

sys.modules[__name__] = _module
