"""Compatibility alias: `chatforge.numerics` is `chatforge.local.numerics`, for code written before the move."""

import sys

from .local import numerics as _module

sys.modules[__name__] = _module
