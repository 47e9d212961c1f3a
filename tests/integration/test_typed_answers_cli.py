"""Typed answers through the real CLI and a real worker: `submit --output-schema`, and a
batch whose results file is CSV with the schema's top-level properties as columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.integration.conftest import RunCli, StartWorker, Worker

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string"}, "pages": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "due": {"type": "string", "format": "date"}},
          "required": ["title", "pages"]}


@pytest.fixture(scope="module")
def worker(module_worker_factory: StartWorker) -> Worker:
    return module_worker_factory(concurrency=8)


def sim_output(*answers: object) -> dict[str, str]:
    return {"SIM_OUTPUT": json.dumps(list(answers)), "SIM_LATENCY_S": "0.05"}


@pytest.mark.usefixtures("worker")
def test_submit_with_an_output_schema_file_gives_the_parsed_output(cli: RunCli,
                                                                   tmp_path: Path) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA), encoding="utf-8")
    answer = {"title": "Q4", "pages": 12, "tags": ["finance"], "due": "2026-12-24"}
    code, out, err = cli("submit", "Summarise the report", "--output-schema", str(schema_file),
                         "--env", f"SIM_OUTPUT={json.dumps([answer])}", "--wait", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["output"] == answer and result["agent_turns"] == 1


def test_a_broken_schema_is_a_usage_error_before_anything_is_submitted(cli: RunCli) -> None:
    code, out, _ = cli("submit", "p", "--output-schema", '{"type": "object", "properties": '
                         '{"a": {"type": "strnig"}}}', "--json")
    assert code == 2
    said = json.loads(out)
    assert said["error"] == "invalid_task"
    assert "output_schema: is not a valid JSON Schema" in said["message"]


@pytest.mark.usefixtures("worker")
def test_a_batch_writes_csv_with_the_schemas_columns_and_resumes_it(cli: RunCli,
                                                                    tmp_path: Path) -> None:
    good = {"title": "A, with a comma", "pages": 3, "tags": ["x", "y"], "due": "2026-01-31"}
    repaired = {"title": "B", "pages": 7}
    rows = [
        {"id": "a", "prompt": "doc a", "envs": sim_output(good)},
        {"id": "b", "prompt": "doc b", "envs": sim_output({**repaired, "due": "soon"},
                                                          repaired)},
        {"id": "c", "prompt": "doc c", "envs": sim_output({"title": "C", "pages": 1,
                                                           "due": "later"})},
    ]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA), encoding="utf-8")
    out = tmp_path / "results.csv"
    command = ("batch", "run", str(inputs), "--output-schema", str(tmp_path / "schema.json"),
               "--out", str(out), "--no-progress", "--json")
    code, stdout, err = cli(*command, timeout=120)
    assert code == 1, err  # one input ended output_invalid
    with out.open(newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["id", "title", "pages", "tags", "due", "status", "error"]
    by_id = {row[0]: dict(zip(table[0], row, strict=True)) for row in table[1:]}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"] == {"id": "a", "title": "A, with a comma", "pages": "3",
                          "tags": '["x", "y"]', "due": "2026-01-31", "status": "succeeded",
                          "error": ""}
    assert (by_id["b"]["title"], by_id["b"]["pages"], by_id["b"]["due"]) == ("B", "7", "")
    assert by_id["b"]["status"] == "succeeded"  # after its repair turn
    assert by_id["c"]["status"] == "failed" and by_id["c"]["title"] == ""
    assert by_id["c"]["error"].startswith("output_invalid: ")
    assert json.loads(stdout)["by_error"] == {"output_invalid": 1}

    before = out.read_bytes()
    code, stdout, err = cli(*command, timeout=120)  # the same command again: a resume
    assert code == 1, err
    assert out.read_bytes() == before
    assert json.loads(stdout)["by_status"] == {"succeeded": 2, "failed": 1}


def test_csv_results_need_a_schema(cli: RunCli, tmp_path: Path) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"prompt": "p"}\n', encoding="utf-8")
    code, _, err = cli("batch", "run", str(inputs), "--out", str(tmp_path / "r.csv"),
                       "--no-progress")
    assert code == 2
    assert "CSV results need one output_schema shared by every input" in err
