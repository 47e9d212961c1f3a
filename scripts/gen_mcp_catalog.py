"""Regenerate sandqueue/mcp_catalog.json from the installed e2b package's MCP types.

Producers validate MCP server names and keys without importing `e2b` (a producer may run
in a web app that must not pull the sandbox SDK in), so the catalog the SDK ships as
TypedDicts is snapshotted here. `tests/unit/test_catalog.py` fails when the snapshot and the
installed SDK disagree; run `python scripts/gen_mcp_catalog.py` after upgrading e2b.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import typing_extensions as te


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "list"
    return {str: "str", int: "int", bool: "bool", float: "float"}.get(tp, "any")


def build_catalog() -> dict[str, Any]:
    """Read `e2b.sandbox.mcp.McpServer` into {name: {required, optional, types}}."""
    import e2b
    from e2b.sandbox import mcp

    servers: dict[str, Any] = {}
    for name, tp in sorted(typing.get_type_hints(mcp.McpServer).items()):
        if te.is_typeddict(tp):
            hints = typing.get_type_hints(tp)
            servers[name] = {
                "required": sorted(tp.__required_keys__),
                "optional": sorted(tp.__optional_keys__),
                "types": {key: _type_name(hints[key]) for key in sorted(hints)},
            }
        else:  # dict[str, Any]: a server that needs no configuration
            servers[name] = {"required": [], "optional": [], "types": {}, "free_form": True}
    version = getattr(e2b, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("e2b")
    return {"e2b_version": version, "servers": servers}


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "sandqueue" / "mcp_catalog.json"
    catalog = build_catalog()
    out.write_text(json.dumps(catalog, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(catalog['servers'])} servers from e2b {catalog['e2b_version']} to {out}")


if __name__ == "__main__":
    main()
