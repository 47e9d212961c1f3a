"""Resolve a task's `${ENV}` references and sealed values on the worker.

Tokens stay on the workers (their environment or `.env`), so they never travel through
Redis; inline per-task secrets arrive sealed (`sandqueue.sealing`) and are opened here.
Every resolved value, and every inline string value of an MCP config, is returned as a
secret for the redactor; so is every task env value that was sealed, came from `${ENV}`, or
has a credential's format (sent in clear under SANDQUEUE_ALLOW_CLEAR_SECRETS).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sandqueue import errors
from sandqueue.catalog import ENV_REF
from sandqueue.sealing import Sealer, is_sealed, looks_like_credential

INLINE_SECRET_MIN_CHARS = 8


def resolve_mcp(
    mcp: dict[str, Any], environ: Mapping[str, str], sealer: Sealer | None = None
) -> tuple[dict[str, Any], list[str]]:
    secrets: list[str] = []
    sealer = sealer or Sealer(None)

    def walk(value: Any, where: str) -> Any:
        if is_sealed(value):
            opened = sealer.unseal(value, where)
            secrets.append(opened)
            return opened
        if isinstance(value, str):
            match = ENV_REF.match(value)
            if match is None:
                if len(value) >= INLINE_SECRET_MIN_CHARS:
                    secrets.append(value)
                return value
            name = match.group(1)
            if name not in environ:
                raise errors.McpConfigError(
                    f"{where} refers to ${{{name}}}, which is not set in this worker's "
                    f"environment; set {name} on every worker (environment or .env)"
                )
            secrets.append(environ[name])
            return environ[name]
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    resolved = {name: walk(config, f"mcp.{name}") for name, config in mcp.items()}
    return resolved, secrets


def resolve_envs(
    envs: Mapping[str, str], environ: Mapping[str, str], sealer: Sealer | None = None
) -> tuple[dict[str, str], list[str]]:
    """A task's sandbox envs with sealed values opened and `${ENV}` values resolved."""
    sealer = sealer or Sealer(None)
    resolved: dict[str, str] = {}
    secrets: list[str] = []
    for name, value in envs.items():
        match = ENV_REF.match(value)
        if is_sealed(value):
            value = sealer.unseal(value, f"envs.{name}")
        elif match is not None:
            if match.group(1) not in environ:
                raise errors.McpConfigError(
                    f"envs.{name} refers to ${{{match.group(1)}}}, which is not set in this "
                    f"worker's environment; set {match.group(1)} on every worker"
                )
            value = environ[match.group(1)]
        elif not looks_like_credential(value):
            resolved[name] = value
            continue
        secrets.append(value)
        resolved[name] = value
    return resolved, secrets
