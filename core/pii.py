"""Redacting personal data (e-mail addresses, phone numbers, card numbers) from text.

Optional (`memory.redact`): applied before a message is stored and before it
reaches the language model, so neither the SQLite file nor a prompt holds it.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal

Kind = Literal["email", "phone", "card"]

_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
# 13-19 digits, optionally grouped by spaces or dashes: checked with Luhn before it is called a card.
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# An international or national number: 7-15 digits with the usual separators.
_PHONE = re.compile(r"(?<![\w.])(?:\+|00)?\(?\d(?:[\s().-]{0,2}\d){6,14}(?![\w.])")
_DATE = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}$|^\d{1,2}[./-]\d{1,2}[./-]\d{2,4}$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def redact(text: str, kinds: Iterable[Kind]) -> str:
    """`text` with each kind of personal data replaced by a label such as [email]."""
    kinds = set(kinds)
    if "email" in kinds:
        text = _EMAIL.sub("[email]", text)
    if "card" in kinds:
        text = _CARD.sub(lambda m: "[card]" if luhn_valid(re.sub(r"\D", "", m.group())) else m.group(), text)
    if "phone" in kinds:
        text = _PHONE.sub(lambda m: m.group() if _DATE.match(m.group()) else "[phone]", text)
    return text
