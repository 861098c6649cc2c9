"""Compatibility alias: `chatforge.transformers_backend` is `chatforge.local.transformers_backend`, for code written before the move."""

import sys

from .local import transformers_backend as _module

sys.modules[__name__] = _module
