"""Batch input: every bad line is reported with its number before anything is submitted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producer.batch import BatchInvalid, derive_batch_id, load_inputs
from sandqueue import errors
from sandqueue.contract import AgentTask


def _prepare(fields: dict[str, Any]) -> AgentTask:
    from pydantic import ValidationError

    try:
        return AgentTask.model_validate(fields)
    except ValidationError as e:
        raise errors.InvalidTask(str(e.errors()[0]["msg"])) from e


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_jsonl_reports_every_bad_line_with_its_number(tmp_path: Path) -> None:
    path = _write(tmp_path, "in.jsonl", "\n".join([
        json.dumps({"prompt": "ok"}),
        json.dumps({"prompt": ""}),
        "not json",
        "[1, 2]",
        json.dumps({"id": "a", "prompt": "x"}),
        json.dumps({"id": "a", "prompt": "y"}),
        json.dumps({"prompt": "x", "mcp": {"githb": {}}}),
    ]))
    with pytest.raises(BatchInvalid) as caught:
        load_inputs(path, prepare=_prepare, defaults={})
    assert [b.line for b in caught.value.bad] == [2, 3, 4, 6, 7]
    assert "already used on line 5" in caught.value.bad[3].message


def test_jsonl_defaults_merge_under_line_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, "in.jsonl", "\n".join([
        json.dumps({"id": "one", "prompt": "p1", "labels": {"row": "1"}}),
        "",
        json.dumps({"prompt": "p2", "model": "claude-opus-4"}),
    ]))
    inputs = load_inputs(path, prepare=_prepare,
                         defaults={"model": "claude-sonnet-4-5", "labels": {"team": "t"}})
    assert [(i.key, i.line) for i in inputs] == [("one", 1), ("line-3", 3)]
    assert inputs[0].task.labels == {"team": "t", "row": "1"}
    assert inputs[0].task.model == "claude-sonnet-4-5"
    assert inputs[1].task.model == "claude-opus-4"


def test_csv_fills_the_prompt_template(tmp_path: Path) -> None:
    path = _write(tmp_path, "issues.csv", "id,number,title\nx1,12,Crash on start\n,13,Typo\n")
    inputs = load_inputs(path, prepare=_prepare, defaults={},
                         template="Triage issue #{number}: {title}")
    assert [i.task.prompt for i in inputs] == ["Triage issue #12: Crash on start",
                                               "Triage issue #13: Typo"]
    assert inputs[0].key == "x1" and inputs[1].key == "line-3"


def test_csv_template_with_a_missing_column_names_the_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, "issues.csv", "number,title\n1,a\n")
    with pytest.raises(BatchInvalid, match="columns: number, title"):
        load_inputs(path, prepare=_prepare, defaults={}, template="{body}")


def test_csv_without_a_template_is_a_usage_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "issues.csv", "number\n1\n")
    with pytest.raises(errors.InvalidTask, match="--prompt-template"):
        load_inputs(path, prepare=_prepare, defaults={})


def test_the_batch_id_depends_on_the_file_and_the_options(tmp_path: Path) -> None:
    path = _write(tmp_path, "in.jsonl", json.dumps({"prompt": "a"}) + "\n")
    first = derive_batch_id(path, {"model": "m"}, None)
    assert first == derive_batch_id(path, {"model": "m"}, None)
    assert first != derive_batch_id(path, {"model": "n"}, None)
    path.write_text(json.dumps({"prompt": "b"}) + "\n")
    assert first != derive_batch_id(path, {"model": "m"}, None)
