"""A task's record as typed data: what `sandqueue status --json` prints and apps can read.

Redis keeps the record (`sq:task:<id>`, see `sandqueue/store.py`) as a hash of strings; this
is the one place that knows each field's type, so scripts get numbers, booleans and ISO 8601
UTC timestamps instead of `"1764650000.123"` and `"1"`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from sandqueue.contract import TaskStatus

_INTS = ("attempt", "deliveries", "tool_calls")
_FLOATS = ("cost_usd",)
_TEXTS = ("worker", "sandbox_id", "error", "last_text")
_TIMES = ("submitted_at", "started_at", "deadline_at", "updated_at", "recovered_at",
          "handed_back_at", "throttled_at")


class TaskInfo(BaseModel):
    """What is known about a task while (and shortly after) it runs; None when not yet."""

    id: str
    status: TaskStatus | str = Field(
        description="a TaskStatus value; a plain string for a status this version does not "
                    "know (e.g. written by a newer worker), so an older reader never breaks")
    attempt: int | None = None
    deliveries: int | None = None
    worker: str | None = None
    sandbox_id: str | None = None
    error: str | None = Field(None, description="error category of the last failed attempt")
    tool_calls: int = 0
    tools: dict[str, int] = Field(default_factory=dict, description="tool name -> calls")
    cost_usd: float | None = None
    cancel_requested: bool = False
    last_text: str | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    deadline_at: datetime | None = None
    updated_at: datetime | None = None
    recovered_at: datetime | None = None
    handed_back_at: datetime | None = None
    throttled_at: datetime | None = None

    @classmethod
    def from_record(cls, task_id: str, record: dict[str, str],
                    status: TaskStatus | str | None = None) -> TaskInfo:
        """Type a raw record; `status` overrides the record's (e.g. derived from the result
        when the record has expired). Fields that do not parse are left out, not guessed."""
        fields: dict[str, Any] = {"id": task_id}
        for name in _INTS:
            fields[name] = _number(record.get(name), int)
        for name in _FLOATS:
            fields[name] = _number(record.get(name), float)
        for name in _TEXTS:
            fields[name] = record.get(name) or None
        for name in _TIMES:
            stamp = _number(record.get(name), float)
            fields[name] = None if stamp is None else datetime.fromtimestamp(stamp, UTC)
        fields["tool_calls"] = fields["tool_calls"] or 0
        fields["tools"] = {k[5:]: n for k, v in record.items()
                           if k.startswith("tool:") and (n := _number(v, int)) is not None}
        fields["cancel_requested"] = record.get("cancel", "") not in ("", "0")
        raw = status if status is not None else record.get("status") or TaskStatus.UNKNOWN
        fields["status"] = _status(str(raw))
        return cls.model_validate(fields)


def _status(value: str) -> TaskStatus | str:
    try:
        return TaskStatus(value)
    except ValueError:
        return value


def _number(value: str | None, kind: type[int] | type[float]) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except ValueError:
        return None
