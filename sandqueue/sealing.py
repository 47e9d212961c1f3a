"""Per-task secrets given inline are encrypted before they reach Redis.

A producer that must pass a secret with one task (an end user's own GitHub token, say)
writes it inline in the MCP config. Before the task is enqueued every inline string value
of its MCP config is sealed with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`)
under the first of `SANDQUEUE_SECRET_KEYS`; workers open it with any of the keys, so keys
rotate by: add the new key first everywhere, wait out queued tasks, drop the old one.
Without keys, a value under a secret-looking name is refused rather than sent in clear;
`${ENV}` references never need sealing (they resolve on the worker).
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from sandqueue import errors
from sandqueue.catalog import ENV_REF

PREFIX = "sq-sealed:v1:"
SECRET_NAME = re.compile(r"token|secret|passw|api_?key|apikey|credential|private|auth|pat$",
                         re.I)


def generate_key() -> str:
    return Fernet.generate_key().decode()


class Sealer:
    def __init__(self, keys: str | None) -> None:
        parts = [k.strip() for k in (keys or "").split(",") if k.strip()]
        try:
            self._fernet = MultiFernet([Fernet(k) for k in parts]) if parts else None
        except (ValueError, TypeError) as e:
            raise errors.ConfigError(
                "SANDQUEUE_SECRET_KEYS holds an invalid key; each must be 32 url-safe base64 "
                "bytes, as `sandqueue keygen` prints"
            ) from e

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, value: str) -> str:
        if self._fernet is None:
            raise errors.ConfigError("no SANDQUEUE_SECRET_KEYS: cannot seal secrets")
        return PREFIX + self._fernet.encrypt(value.encode()).decode()

    def unseal(self, value: str, where: str) -> str:
        if self._fernet is None:
            raise errors.McpConfigError(
                f"{where} is sealed but this worker has no SANDQUEUE_SECRET_KEYS; give workers "
                "the same keys as producers"
            )
        try:
            return self._fernet.decrypt(value[len(PREFIX):].encode()).decode()
        except InvalidToken as e:
            raise errors.McpConfigError(
                f"{where} cannot be decrypted with this worker's SANDQUEUE_SECRET_KEYS; during a "
                "key rotation add the new key to every worker before producers use it"
            ) from e


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def seal_mcp(mcp: dict[str, Any], sealer: Sealer) -> dict[str, Any]:
    """A copy of an MCP config with every inline string value sealed (producer side)."""

    def walk(value: Any, key: str, where: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or ENV_REF.match(value) or is_sealed(value):
            return value
        if sealer.enabled:
            return sealer.seal(value)
        if SECRET_NAME.search(key):
            raise errors.InvalidTask(
                f"{where} looks like a secret and would travel through Redis in clear: write "
                f"it as ${{ENV_NAME}} (resolved on the worker) or set SANDQUEUE_SECRET_KEYS "
                "on producers and workers to encrypt inline values"
            )
        return value

    return {name: walk(config, name, f"mcp.{name}") for name, config in mcp.items()}
