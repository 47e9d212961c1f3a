"""The MCP catalog snapshot: in step with the installed SDK, and the helpers built on it."""

from __future__ import annotations

import importlib.util
import json
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sandqueue import catalog

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO / "sandqueue" / "mcp_catalog.json"
GENERATOR = REPO / "scripts" / "gen_mcp_catalog.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_mcp_catalog", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(generator: ModuleType) -> dict[str, Any]:
    return generator.build_catalog()


def test_snapshot_equals_what_the_installed_sdk_describes(built: dict[str, Any]) -> None:
    # When this fails after upgrading the SDK: run `python scripts/gen_mcp_catalog.py`.
    snapshot = json.loads(SNAPSHOT.read_text())
    assert snapshot["e2b_version"] == built["e2b_version"]
    assert sorted(snapshot["servers"]) == sorted(built["servers"])
    assert snapshot == built


def test_packaged_catalog_is_the_snapshot_file() -> None:
    assert catalog.catalog() == json.loads(SNAPSHOT.read_text())


def test_catalog_is_large(built: dict[str, Any]) -> None:
    assert len(catalog.server_names()) >= 200
    assert len(built["servers"]) >= 200


@pytest.mark.parametrize(
    ("server", "required"),
    [("githubOfficial", ["githubPersonalAccessToken"]), ("notion", ["internalIntegrationToken"])],
)
def test_required_keys_are_those_of_the_sdk(server: str, required: list[str]) -> None:
    from e2b.sandbox import mcp  # the SDK's own TypedDicts, read directly

    sdk_type = typing.get_type_hints(mcp.McpServer)[server]
    assert sorted(sdk_type.__required_keys__) == required
    spec = catalog.catalog()["servers"][server]
    assert spec["required"] == required
    assert spec["types"] == {key: "str" for key in required}


def test_every_entry_is_well_formed() -> None:
    for name, spec in catalog.catalog()["servers"].items():
        assert set(spec) <= {"required", "optional", "types", "free_form"}, name
        assert set(spec["types"]) == set(spec["required"]) | set(spec["optional"]), name
        assert set(spec["types"].values()) <= {"str", "int", "float", "bool", "list", "any"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("githubOffical", "githubOfficial"), ("GITHUBOFFICIAL", "githubOfficial"),
     ("notoin", "notion"), ("slak", "slack")],
)
def test_closest_finds_the_intended_name(name: str, expected: str) -> None:
    hits = catalog.closest(name, catalog.server_names())
    assert expected in hits
    assert len(hits) <= 3


def test_closest_suggests_by_prefix() -> None:
    assert catalog.closest("gith", ["githubOfficial", "notion"]) == ["githubOfficial"]


def test_closest_suggests_nothing_for_nonsense() -> None:
    assert catalog.closest("qqqqqqqqzzz", catalog.server_names()) == []


def test_env_refs_finds_whole_value_references_at_any_depth() -> None:
    mcp = {
        "githubOfficial": {"githubPersonalAccessToken": "${GITHUB_TOKEN}"},
        "filesystem": {"paths": ["/a", "${DATA_DIR}"]},
        "github/o/r": {"run_cmd": "x ${NOT_WHOLE}", "envs": {"K": "${API_KEY}"}},
        "jetbrains": {"port": 1},
    }
    assert catalog.env_refs(mcp) == {"GITHUB_TOKEN", "DATA_DIR", "API_KEY"}
