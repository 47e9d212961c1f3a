"""A batch's results as CSV (`batch run ... --out results.csv`): one row per input, one
column per top-level property of the tasks' `output_schema`.

Columns: `id` (the input's key), the schema's top-level properties in the order the schema
declares them (each cell the answer's value: text as it is, numbers and booleans as JSON,
objects and lists as JSON text, empty when absent), then `status` and `error` (`category:
message` for a task that did not succeed). Text that a spreadsheet would run as a formula
(it starts with `=`, `+`, `-`, `@`, a tab or a carriage return: OWASP's "CSV injection") is
written with a leading `'`, which spreadsheets show as text and do not display: an agent's
answer is untrusted text, and a cell like `=HYPERLINK(...)` must not run on a reviewer's
machine. Rows are appended as tasks complete, as the JSONL
file's lines are, and a resumed run reads the file back to skip what is done.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sandqueue import errors, schemas
from sandqueue.contract import AgentTask

OWN_COLUMNS = ("id", "status", "error")


def shared_schema(tasks: list[AgentTask], out: Path) -> dict[str, Any]:
    """The one output_schema every input has: a CSV has one set of columns."""
    found = {json.dumps(t.output_schema, sort_keys=True) for t in tasks}
    if found == {"null"} or len(found) != 1:
        raise errors.InvalidTask(
            f"--out {out.name}: CSV results need one output_schema shared by every input (give "
            "--output-schema); its top-level properties become the columns. Or write JSONL "
            "(--out results.jsonl)")
    schema = tasks[0].output_schema
    assert schema is not None
    clash = sorted(set(schemas.columns(schema)) & set(OWN_COLUMNS))
    if clash:
        own = ", ".join(OWN_COLUMNS)
        raise errors.InvalidTask(
            f"--out {out.name}: the schema's propert{'ies' if len(clash) > 1 else 'y'} "
            f"{', '.join(clash)} would clash with the CSV's own columns ({own}); rename it "
            "or write JSONL")
    return schema


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return _text(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _text(value: str) -> str:
    """Text as a spreadsheet shows it, never as a formula it runs."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def _untext(cell: str) -> str:
    """`_text` undone (an input's id read back on a resume)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


class CsvResults:
    def __init__(self, path: Path, schema: dict[str, Any]) -> None:
        self.path = path
        self.fields = schemas.columns(schema)
        self.header = ["id", *self.fields, "status", "error"]

    def row(self, line: dict[str, Any]) -> list[str]:
        """A result line (`id` plus the AgentResult's fields) as a CSV row."""
        if "_row" in line:  # read back from the file on a resume: kept as it was
            return list(line["_row"])
        output = line.get("output") if isinstance(line.get("output"), dict) else {}
        error = line.get("error") or {}
        said = f"{error.get('category')}: {error.get('message', '')}"[:1000] if error else ""
        return [_text(str(line.get("id"))), *(_cell(output.get(f)) for f in self.fields),
                str(line.get("status", "")), _text(said)]

    def read(self) -> list[dict[str, Any]]:
        """The rows already written, as result lines enough to resume (id, status, error)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is not None and header != self.header:
                raise errors.InvalidTask(
                    f"{self.path} has the columns {', '.join(header)}, not those of this "
                    f"schema ({', '.join(self.header)}); give another --out")
            lines = []
            for values in reader:
                if len(values) != len(self.header):
                    continue  # a row cut short by a crash: the task is followed again
                cells = dict(zip(self.header, values, strict=True))
                category = cells["error"].partition(":")[0]
                lines.append({"id": _untext(cells["id"]), "status": cells["status"], "_row": values,
                              "error": {"category": category} if category else None})
            return lines

    def rewrite(self, lines: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(self.header)
            writer.writerows(self.row(line) for line in lines)
        tmp.replace(self.path)

    def append(self, line: dict[str, Any]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(self.row(line))
