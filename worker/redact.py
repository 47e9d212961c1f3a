"""Remove every secret value a task used from whatever leaves the worker.

Results, events, logs and error messages pass through here: the agent may echo a token
back, and an SDK error may quote a header. Values are replaced wherever they occur.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any, TypeVar

from pydantic import BaseModel

MASK = "[REDACTED]"
MIN_SECRET_CHARS = 4
"""Shorter values are not treated as secrets: masking "1" would shred every number."""

M = TypeVar("M", bound=BaseModel)


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= MIN_SECRET_CHARS and value not in self._secrets:
                self._secrets.append(value)
        self._secrets.sort(key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value

    def deep(self, value: Any) -> Any:
        """Redact string values; keys and enum members are structure, not data."""
        if isinstance(value, Enum):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(v) for v in value]
        return value

    def model(self, model: M) -> M:
        if not self._secrets:
            return model
        return type(model).model_validate(self.deep(model.model_dump()))
