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


def test_csv_saved_with_a_bom_keeps_its_id_column(tmp_path: Path) -> None:
    # Given a CSV as Excel saves it ("CSV UTF-8"): a BOM before the first column's name
    path = tmp_path / "issues.csv"
    path.write_bytes(b"\xef\xbb\xbfid,title\r\nx1,Crash\r\nx2,Typo\r\n")
    # When it is loaded with a template that uses the first column
    inputs = load_inputs(path, prepare=_prepare, defaults={}, template="{id}: {title}")
    # Then the column is `id`, not "\ufeffid": it keys the inputs and fills the template
    assert [i.key for i in inputs] == ["x1", "x2"]
    assert [i.task.prompt for i in inputs] == ["x1: Crash", "x2: Typo"]


def test_jsonl_saved_with_a_bom_parses(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "p"}).encode() + b"\n")
    inputs = load_inputs(path, prepare=_prepare, defaults={})
    assert [(i.key, i.line, i.task.prompt) for i in inputs] == [("a", 1, "p")]


def test_a_bom_inside_the_text_is_kept_byte_exact(tmp_path: Path) -> None:
    # Only the leading BOM is an encoding mark; one inside a prompt is the user's text
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "a\ufeffb"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert load_inputs(path, prepare=_prepare, defaults={})[0].task.prompt == "a\ufeffb"


def test_csv_multi_line_records_are_reported_at_their_first_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "issues.csv", "\n".join([
        "id,title",                # 1
        'a,"first line',           # 2: a record over lines 2-4
        "second line",             # 3
        'third line"',             # 4
        "",                        # 5: blank, skipped
        'b,"spans',                # 6: bad record over lines 6-7 (extra field)
        'two lines",extra',        # 7
        'c,"ok"',                  # 8
        'd,"short',                # 9: bad record over lines 9-10 (template column)
        'too"',                    # 10
    ]) + "\n")
    with pytest.raises(BatchInvalid) as caught:
        load_inputs(path, prepare=_prepare, defaults={}, template="{title}")
    assert [b.line for b in caught.value.bad] == [6]
    path.write_text(path.read_text().replace(",extra", ""))
    inputs = load_inputs(path, prepare=_prepare, defaults={}, template="{title}")
    assert [(i.key, i.line) for i in inputs] == [("a", 2), ("b", 6), ("c", 8), ("d", 9)]
    assert inputs[0].task.prompt == "first line\nsecond line\nthird line"


def test_csv_template_errors_on_a_multi_line_record_name_its_first_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "issues.csv", 'id,title\na,"one\ntwo"\nb,"three\nfour"\n')
    with pytest.raises(BatchInvalid) as caught:
        load_inputs(path, prepare=_prepare, defaults={}, template="{body}")
    assert [b.line for b in caught.value.bad] == [2, 4]


def test_csv_rows_with_too_few_or_too_many_fields_are_invalid(tmp_path: Path) -> None:
    # Given rows that do not match the header: one short (no title), one with an unquoted comma
    path = _write(tmp_path, "issues.csv", "\n".join([
        "id,number,title",
        "a,1,Fine",
        "b,2",
        "c,3,Crash, then hang",
        "d,4,Fine too",
    ]) + "\n")
    # When the batch is loaded, Then nothing is returned (so nothing is submitted) and both
    # rows are reported by line with the header's shape and the fix
    with pytest.raises(BatchInvalid) as caught:
        load_inputs(path, prepare=_prepare, defaults={}, template="#{number}: {title}")
    bad = caught.value.bad
    assert [b.line for b in bad] == [3, 4]
    assert "2 field(s) but the header has 3 (id, number, title)" in bad[0].message
    assert "4 field(s) but the header has 3" in bad[1].message
    assert "quote" in bad[1].message
    assert "None" not in str(caught.value)


def test_a_short_csv_row_never_reaches_a_prompt_as_none(tmp_path: Path) -> None:
    # Even when the template does not use the missing column, the row is rejected: the user's
    # columns have shifted and whatever the template uses may be the wrong field
    path = _write(tmp_path, "issues.csv", "number,title\n1\n")
    with pytest.raises(BatchInvalid, match="line 2: 1 field"):
        load_inputs(path, prepare=_prepare, defaults={}, template="#{number}")


def test_jsonl_fields_that_are_not_task_fields_are_template_variables(tmp_path: Path) -> None:
    # Given JSONL lines whose data fields only the template uses
    path = _write(tmp_path, "in.jsonl", "\n".join([
        json.dumps({"number": 7, "title": "crash on start"}),
        json.dumps({"id": "x", "number": 8, "title": "typo", "max_turns": 2, "unused": 1}),
        json.dumps({"prompt": "its own prompt", "number": 9}),
    ]))
    # When it is loaded with a template
    inputs = load_inputs(path, prepare=_prepare, defaults={},
                         template="Triage #{number}: {title}")
    # Then they fill the prompt and stay out of the task; task fields still apply
    assert [(i.key, i.task.prompt) for i in inputs] == [
        ("line-1", "Triage #7: crash on start"), ("x", "Triage #8: typo"),
        ("line-3", "its own prompt")]
    assert inputs[1].task.max_turns == 2
    # and without a template an unknown field is still an error
    with pytest.raises(BatchInvalid, match="line 3: Extra inputs are not permitted"):
        load_inputs(path, prepare=_prepare, defaults={})
