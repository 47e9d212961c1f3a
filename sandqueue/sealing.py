"""Per-task secrets given inline are encrypted before they reach Redis.

A producer that must pass a secret with one task (an end user's own GitHub token, say)
writes it inline in the MCP config. Before the task is enqueued every inline string value
of its MCP config is sealed with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`)
under the first of `SANDQUEUE_SECRET_KEYS`; workers open it with any of the keys, so keys
rotate by: add the new key first everywhere, wait out queued tasks, drop the old one.

Without keys every inline string value of an MCP config is refused rather than sent in
clear: no name-based guess can tell a connection string or a kubeconfig from a harmless
setting. What stays usable without keys: `${ENV}` references (resolved on the worker),
numbers and booleans, and the `run_cmd` / `install_cmd` of a custom `github/<owner>/<repo>`
server, which are command lines (sealed or refused only if they contain a credential). Task `envs`
are not secret by default, but a value in a well-known credential format (`CREDENTIAL`)
is sealed with keys and refused without. `SANDQUEUE_ALLOW_CLEAR_SECRETS=true` lets inline
values travel in clear, for development only.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from sandqueue import errors
from sandqueue.catalog import ENV_REF, GITHUB_PREFIX

PREFIX = "sq-sealed:v1:"


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


CREDENTIAL = re.compile(
    r"\bgh[pousr]_[A-Za-z0-9]{36,}"                   # GitHub tokens (classic, OAuth, app)
    r"|\bgithub_pat_[A-Za-z0-9_]{22,}"                # GitHub fine-grained tokens
    r"|\bsk-ant-[A-Za-z0-9_-]{20,}"                   # Anthropic
    r"|\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"                 # AWS access key ids
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"               # Slack
    r"|-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"    # PEM private keys
    r"|\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # JWTs
    r"|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{20,}"        # bearer tokens
)
"""Well-known credential formats; chosen for few false positives, not to catch all."""

COMMAND_KEYS = frozenset({"run_cmd", "install_cmd"})
"""Keys of a custom github/<owner>/<repo> server that hold command lines, not secrets."""


def looks_like_credential(value: str) -> bool:
    return CREDENTIAL.search(value) is not None


def _refusal(where: str, what: str) -> errors.InvalidTask:
    return errors.InvalidTask(
        f"{where} {what} and would travel through Redis in clear: write it as ${{ENV_NAME}} "
        "(resolved from the worker's environment) or set SANDQUEUE_SECRET_KEYS on producers "
        "and workers to encrypt inline values (`sandqueue keygen` makes a key); for "
        "development only, SANDQUEUE_ALLOW_CLEAR_SECRETS=true sends them in clear"
    )


class SecretPolicy:
    """Applies the rules above to a task's MCP config and envs (producer side); records
    where a value went in clear because clear values are allowed, so the producer warns."""

    def __init__(self, sealer: Sealer, allow_clear: bool = False) -> None:
        self.sealer = sealer
        self.allow_clear = allow_clear
        self.sent_in_clear: list[str] = []

    def _inline(self, value: str, where: str, what: str) -> str:
        if self.sealer.enabled:
            return self.sealer.seal(value)
        if not self.allow_clear:
            raise _refusal(where, what)
        self.sent_in_clear.append(where)
        return value

    def mcp(self, mcp: dict[str, Any]) -> dict[str, Any]:
        """A copy of an MCP config with every inline string value sealed."""

        def walk(value: Any, where: str, command: bool = False) -> Any:
            if isinstance(value, dict):
                return {k: walk(v, f"{where}.{k}") for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
            if not isinstance(value, str) or ENV_REF.match(value) or is_sealed(value):
                return value
            if not command:
                return self._inline(value, where, "is an inline value")
            if looks_like_credential(value):  # then the whole command line is a secret
                return self._inline(value, where, "contains what looks like a credential")
            return value

        def server(name: str, config: Any) -> Any:
            if not name.startswith(GITHUB_PREFIX) or not isinstance(config, dict):
                return walk(config, f"mcp.{name}")
            return {k: walk(v, f"mcp.{name}.{k}", command=k in COMMAND_KEYS)
                    for k, v in config.items()}

        return {name: server(name, config) for name, config in mcp.items()}

    def envs(self, envs: dict[str, str]) -> dict[str, str]:
        """Task envs: values in a credential format are sealed (or refused without keys)."""
        return {name: self._inline(value, f"envs.{name}", "looks like a credential")
                if looks_like_credential(value) and not is_sealed(value) else value
                for name, value in envs.items()}


def seal_mcp(mcp: dict[str, Any], sealer: Sealer, *, allow_clear: bool = False
             ) -> dict[str, Any]:
    """A copy of an MCP config with every inline string value sealed (producer side)."""
    return SecretPolicy(sealer, allow_clear).mcp(mcp)
