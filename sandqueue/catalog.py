"""The Docker MCP catalog as the installed `e2b` SDK describes it, without importing `e2b`.

`mcp_catalog.json` is generated from `e2b.sandbox.mcp.McpServer` by
`scripts/gen_mcp_catalog.py`; a unit test keeps it in step with the installed SDK. Values
may be `${ENV_NAME}` references that a worker resolves from its own environment, so a
token never has to travel through Redis.
"""

from __future__ import annotations

import difflib
import json
import re
from functools import cache
from importlib import resources
from typing import Any

ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
"""A whole config value of the form `${NAME}`: read NAME from the worker's environment."""

GITHUB_PREFIX = "github/"
GITHUB_NAME = re.compile(r"^github/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+\Z")
GITHUB_KEYS = {"run_cmd": "str", "install_cmd": "str", "envs": "dict"}

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "any": (str, int, float, bool, list, dict),
}


@cache
def catalog() -> dict[str, Any]:
    """The snapshot: {"e2b_version": str, "servers": {name: {required, optional, types}}}."""
    text = resources.files("sandqueue").joinpath("mcp_catalog.json").read_text()
    return json.loads(text)


def server_names() -> list[str]:
    return sorted(catalog()["servers"])


def closest(name: str, choices: list[str], n: int = 3) -> list[str]:
    """Closest names, case-insensitively: difflib's closest first, then names extending the
    typo's stem (so `githubb` suggests `github`, then `githubChat`, `githubOfficial`), then
    difflib's other similar names."""
    lowered = {c.lower(): c for c in choices}
    stem = name.lower().rstrip("0123456789")
    stem = stem[:-1] if len(stem) > 3 else stem
    prefixed = sorted((c for c in choices if c.lower().startswith(stem) and c.lower() != stem),
                      key=lambda c: (len(c), c))
    similar = [lowered[h] for h in difflib.get_close_matches(name.lower(), list(lowered), n=n,
                                                             cutoff=0.5)]
    ranked: list[str] = []
    for c in similar[:1] + prefixed + similar[1:]:
        if c not in ranked:
            ranked.append(c)
    return ranked[:n]


def _check_value(server: str, key: str, value: Any, type_name: str) -> None:
    if isinstance(value, str) and value.startswith("${"):
        if not ENV_REF.match(value):
            raise ValueError(
                f"mcp.{server}.{key}: {value!r} is not a valid environment reference; "
                "write it as ${NAME} with letters, digits and underscores"
            )
        return
    allowed = _PY_TYPES.get(type_name, _PY_TYPES["any"])
    is_bool_for_number = isinstance(value, bool) and type_name in {"int", "float"}
    if not isinstance(value, allowed) or is_bool_for_number:
        raise ValueError(
            f"mcp.{server}.{key} must be {type_name}, got {type(value).__name__} "
            f"(or use a ${{ENV_NAME}} reference resolved on the worker)"
        )
    if type_name == "list" and not all(isinstance(v, str) for v in value):
        raise ValueError(f"mcp.{server}.{key} must be a list of strings")


def _validate_github(name: str, config: Any) -> None:
    if not GITHUB_NAME.match(name):
        raise ValueError(f"mcp server {name!r}: custom servers are named github/<owner>/<repo>")
    if not isinstance(config, dict) or not isinstance(config.get("run_cmd"), str):
        raise ValueError(
            f"mcp.{name} needs run_cmd (the command that starts a stdio MCP server), "
            'e.g. {"run_cmd": "npx -y ."}'
        )
    unknown = sorted(set(config) - set(GITHUB_KEYS))
    if unknown:
        raise ValueError(f"mcp.{name}: unknown keys {unknown}; allowed: {sorted(GITHUB_KEYS)}")
    if "install_cmd" in config and not isinstance(config["install_cmd"], str):
        raise ValueError(f"mcp.{name}.install_cmd must be a string")
    envs = config.get("envs", {})
    if not isinstance(envs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
    ):
        raise ValueError(f"mcp.{name}.envs must map names to string values")


def validate_server(name: str, config: Any) -> None:
    """Raise ValueError naming what is wrong and how to fix it."""
    if name.startswith(GITHUB_PREFIX):
        _validate_github(name, config)
        return
    servers = catalog()["servers"]
    spec = servers.get(name)
    if spec is None:
        hint = closest(name, list(servers))
        did_you_mean = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise ValueError(
            f"unknown MCP server {name!r}{did_you_mean} "
            f"(the catalog of e2b {catalog()['e2b_version']} has {len(servers)} servers; "
            "custom servers are named github/<owner>/<repo>)"
        )
    if not isinstance(config, dict):
        raise ValueError(f"mcp.{name} must be an object of settings, got {type(config).__name__}")
    if spec.get("free_form"):
        return
    missing = [k for k in spec["required"] if k not in config]
    if missing:
        raise ValueError(
            f"mcp.{name} is missing required key(s) {missing}; "
            f"give them, e.g. --mcp-config {name}.{missing[0]}=${{ENV_NAME}}"
        )
    known = set(spec["required"]) | set(spec["optional"])
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"mcp.{name}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    for key, value in config.items():
        _check_value(name, key, value, spec["types"].get(key, "any"))


def env_refs(mcp: dict[str, Any]) -> set[str]:
    """Every ${NAME} the worker will have to resolve for this MCP configuration."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            match = ENV_REF.match(value)
            if match:
                found.add(match.group(1))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(mcp)
    return found
