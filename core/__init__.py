"""chatforge: a chat-bot plugin framework on a local language model.

This module is the public API for plugin authors; names here will not change
without a major version:

    from chatforge import hookimpl, Message, Reply, CommandContext, PluginConfig

See docs/plugins.md for a guide and the hook reference.
"""

from __future__ import annotations

from .commands import CommandContext
from .config import ConfigError
from .config import StrictModel as PluginConfig
from .hookspecs import PROJECT_NAME, hookimpl
from .language import Detection, detect_language
from .memory import Turn
from .message import Message, Reply
from .skill import Lazy, SkillError, Trigger, check_length, match_trigger, require

__version__ = "0.1.0"

__all__ = [
    "PROJECT_NAME",
    "CommandContext",
    "ConfigError",
    "Detection",
    "Lazy",
    "SkillError",
    "Trigger",
    "check_length",
    "detect_language",
    "match_trigger",
    "require",
    "Message",
    "PluginConfig",
    "Reply",
    "Turn",
    "__version__",
    "hookimpl",
]
