"""Keeping secrets (bot tokens) out of every log line and error message.

Client libraries log request URLs (a Telegram URL contains the bot token) and
exceptions may quote them; a filter on the log handlers replaces every known
secret with "***" whatever logger the line comes from.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from pydantic import BaseModel, SecretStr

MASK = "***"


class SecretRedactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secrets: Iterable[str]) -> None:
        self.secrets.update(secret for secret in secrets if len(secret) >= 4)

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = self.redact(message), ()
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
            record.exc_info = None  # formatted (and redacted) already
        return True


REDACTOR = SecretRedactor()


def install(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Put the redactor on the root logger's handlers (every library's lines pass through them)."""
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)


def secrets_in(config: Any) -> list[str]:
    """Every SecretStr value in a config model, however deeply nested."""
    found: list[str] = []
    if isinstance(config, SecretStr):
        found.append(config.get_secret_value())
    elif isinstance(config, BaseModel):
        for name in type(config).model_fields:
            found += secrets_in(getattr(config, name))
    elif isinstance(config, dict):
        for value in config.values():
            found += secrets_in(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            found += secrets_in(value)
    return found
