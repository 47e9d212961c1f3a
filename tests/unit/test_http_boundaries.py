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


def test_a_body_that_is_not_json_says_so_and_how_to_send_it() -> None:
    # The errors FastAPI reports for a body that never became a JSON object.
    from producer.http.problems import describe_validation
    bad_json = [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                 "ctx": {"error": "Expecting property name enclosed in double quotes"}}]
    said = describe_validation(bad_json, "application/json")
    assert "not valid JSON" in said and "Expecting property name" in said and "1" in said
    form = [{"type": "model_attributes_type", "loc": ("body",),
             "msg": "Input should be a valid dictionary or object to extract fields from"}]
    said = describe_validation(form, "application/x-www-form-urlencoded")
    assert "Content-Type: application/json" in said and "x-www-form-urlencoded" in said
    assert "Content-Type" not in describe_validation(form, "application/json")
    empty = [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
    assert "body is empty" in describe_validation(empty, "application/json")
    fields = [{"type": "string_type", "loc": ("body", "prompt"),
               "msg": "Input should be a valid string"}]
    said = describe_validation(fields, None)
    assert said == "invalid task: prompt: Input should be a valid string"


def test_a_bad_query_parameter_is_not_called_an_invalid_task() -> None:
    from producer.http.problems import describe_validation
    limit = [{"type": "greater_than_equal", "loc": ("query", "limit"),
              "msg": "Input should be greater than or equal to 1"}]
    said = describe_validation(limit, None)
    assert said == "invalid request: query.limit: Input should be greater than or equal to 1"
