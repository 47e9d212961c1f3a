"""The HTTP API's response bodies (request bodies are the contract's own `AgentTask`)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from sandqueue.contract import AgentResult, TaskStatus


class Links(BaseModel):
    self: str
    result: str
    events: str
    cancel: str


def links(task_id: str) -> Links:
    base = f"/v1/tasks/{task_id}"
    return Links(self=base, result=f"{base}/result", events=f"{base}/events",
                 cancel=f"{base}/cancel")


class Submitted(BaseModel):
    id: str
    status: TaskStatus
    duplicate: bool = Field(description="an earlier task with the same idempotency key")
    links: Links


class TaskView(BaseModel):
    id: str
    status: TaskStatus
    tenant: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    submitted_at: float | None = None
    updated_at: float | None = None
    attempt: int | None = None
    error: str | None = Field(None, description="error category once it failed")
    result: AgentResult | None = Field(None, description="present once the task has ended")
    links: Links


class TaskPage(BaseModel):
    items: list[TaskView]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class Pending(BaseModel):
    id: str
    status: TaskStatus
    detail: str


class CancelOutcome(BaseModel):
    id: str
    outcome: str = Field(description="cancelled (it never starts), requested (its worker "
                                     "stops it within seconds), ended (it had finished)")
    status: TaskStatus | None = Field(None, description="the status it had ended with")


def view(task_id: str, record: dict[str, str], result: dict[str, Any] | None) -> TaskView:
    """A task's public view: only the fields an owner may see (no message, no fingerprint)."""
    def number(name: str) -> float | None:
        return float(record[name]) if record.get(name) else None


    status = record.get("status") or (result or {}).get("status") or TaskStatus.UNKNOWN.value
    return TaskView(
        id=task_id, status=TaskStatus(status), tenant=record.get("tenant") or None,
        labels=json.loads(record["labels"]) if record.get("labels") else {},
        submitted_at=number("submitted_at"), updated_at=number("updated_at"),
        attempt=int(record["attempt"]) if record.get("attempt") else None,
        error=record.get("error") or None,
        result=AgentResult.model_validate(result) if result else None, links=links(task_id))
