"""The HTTP API stays out of the way: `import producer` and the CLI load no web framework
(`serve` imports it when it runs), and the API itself is producer code: no worker, no SDK."""

from __future__ import annotations

import pytest

from tests.unit.test_boundaries import _modules_after_import, _under

WEB = ("fastapi", "starlette", "uvicorn")


@pytest.mark.parametrize("module", ["producer", "producer.cli"])
def test_producer_and_cli_load_no_web_framework(module: str) -> None:
    modules = _modules_after_import(module)
    for top in WEB:
        assert _under(modules, top) == [], top


def test_the_http_api_imports_neither_worker_nor_sdk() -> None:
    modules = _modules_after_import("producer.http.app")
    assert _under(modules, "fastapi")  # the probe really loaded the app
    assert _under(modules, "worker") == [] and _under(modules, "e2b") == []
