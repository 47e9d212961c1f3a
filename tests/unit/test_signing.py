"""Signed task messages: with SANDQUEUE_SIGNING_KEYS, write access to Redis alone cannot make
a worker run a task (forged, altered or unsigned messages end as invalid_task, no sandbox)."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from producer.api import Client
from sandqueue import keys
from sandqueue.contract import AgentResult, AgentTask, ErrorCategory, TaskStatus
from sandqueue.settings import Settings
from worker.runtime import Runtime


def settings(signing: str | None) -> Settings:
    return Settings(_env_file=None, sandbox="sim", backoff_scale=0,  # type: ignore[call-arg]
                    sim_create_latency_s=0, sim_latency_s=0.01, signing_keys=signing)


def worker(signing: str | None) -> Runtime:
    rt = Runtime(settings(signing), worker_name="w-sign")
    rt.__dict__["redis"] = fakeredis.FakeRedis()
    rt.start_maintenance = lambda: None  # type: ignore[method-assign]
    return rt


def body(signing: str | None, task_id: str, prompt: str = "hello") -> dict[str, Any]:
    """The message exactly as a producer with these keys builds it."""
    client = Client(settings(signing))
    return client._body(task_id, AgentTask(prompt=prompt), 1.0)


def run(rt: Runtime, task_id: str, message: dict[str, Any]) -> AgentResult:
    return AgentResult.model_validate(rt.handle(task_id, (message,), {}))


def sandboxes(rt: Runtime) -> int:
    return int(rt.redis.get(keys.SIM_CREATED) or 0)


def test_a_signed_message_runs() -> None:
    rt = worker("k1")
    assert run(rt, "t1", body("k1", "t1")).status is TaskStatus.SUCCEEDED


@pytest.mark.parametrize("message_of", [
    lambda: body(None, "t1"),                                       # unsigned
    lambda: {**body("k1", "t1"), "task": {"prompt": "rm -rf /"}},   # altered after signing
    lambda: body("k1", "other-task"),                               # signed for another id
    lambda: body("not-the-key", "t1"),                              # forged with another key
])
def test_unsigned_altered_or_forged_messages_never_run(message_of: Any) -> None:
    rt = worker("k1")
    result = run(rt, "t1", message_of())
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category is ErrorCategory.INVALID_TASK
    assert "SANDQUEUE_SIGNING_KEYS" in result.error.message
    assert sandboxes(rt) == 0


def test_keys_rotate_new_first_old_still_verifies() -> None:
    rt = worker("k2,k1")
    assert run(rt, "t1", body("k1", "t1")).status is TaskStatus.SUCCEEDED
    assert run(rt, "t2", body("k2,k1", "t2")).status is TaskStatus.SUCCEEDED


def test_without_keys_nothing_is_signed_or_checked() -> None:
    assert "sig" not in body(None, "t1")
    assert run(worker(None), "t1", body(None, "t1")).status is TaskStatus.SUCCEEDED
