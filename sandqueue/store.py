"""Task records in Redis: the state a producer can ask about while a task is not finished.

Celery's result backend holds the final `AgentResult`; this hash holds what happens before
(queued, running, retrying, which attempt, which sandbox) and survives a worker crash, so a
re-delivered task keeps its original deadline.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from sandqueue import keys
from sandqueue.contract import TaskStatus


class TaskStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s

    def mark_queued(self, task_id: str, submitted_at: float, pipe: Any = None) -> None:
        target = pipe if pipe is not None else self.r.pipeline(transaction=False)
        key = keys.task(task_id)
        target.hset(key, mapping={"status": TaskStatus.QUEUED.value, "submitted_at": submitted_at})
        target.expire(key, self.ttl_s)
        if pipe is None:
            target.execute()

    def begin(self, task_id: str, deadline_s: float, worker: str) -> tuple[float, int]:
        """Record a start; returns (deadline_at, delivery) kept from the first delivery."""
        key = keys.task(task_id)
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(key, "started_at", now)
        pipe.hsetnx(key, "deadline_at", now + deadline_s)
        pipe.hincrby(key, "deliveries", 1)
        pipe.hset(key, mapping={"status": TaskStatus.RUNNING.value, "worker": worker,
                                "updated_at": now})
        pipe.expire(key, self.ttl_s)
        pipe.hget(key, "deadline_at")
        out = pipe.execute()
        return float(out[-1]), int(out[2])

    def update(self, task_id: str, **fields: Any) -> None:
        key = keys.task(task_id)
        values = {k: (v.value if isinstance(v, TaskStatus) else v) for k, v in fields.items()
                  if v is not None}
        values["updated_at"] = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping=values)
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def get(self, task_id: str) -> dict[str, str]:
        raw = self.r.hgetall(keys.task(task_id))
        return {_s(k): _s(v) for k, v in raw.items()}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
