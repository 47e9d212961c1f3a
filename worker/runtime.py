"""Per-process state of a worker: settings, one Redis pool, the provider, the watchdog.

Built lazily on first use, after any fork, and shared by every thread of the pool: threads
share Redis connections (a pool) instead of opening one each.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cached_property
from typing import Any

import redis
from pydantic import ValidationError

from sandqueue import errors
from sandqueue.contract import AgentResult, TaskMessage, TaskStatus
from sandqueue.settings import Settings, load_settings
from sandqueue.store import TaskStore
from worker.agent.claude_code import ClaudeCodeAgent
from worker.agent.watchdog import Watchdog
from worker.pipeline import Pipeline, TaskContext
from worker.sandbox import make_provider

log = logging.getLogger(__name__)


def describe_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=5,
                                    socket_timeout=30, retry_on_timeout=True,
                                    health_check_interval=25)

    @cached_property
    def store(self) -> TaskStore:
        return TaskStore(self.redis, self.settings.result_expires_s)

    @cached_property
    def pipeline(self) -> Pipeline:
        provider = make_provider(self.settings, self.redis)
        agent = ClaudeCodeAgent(Watchdog(), stall_timeout_s=self.settings.stall_timeout_s,
                                claude_command=self.settings.claude_command)
        return Pipeline(self.settings, provider, agent)

    def handle(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               worker: str = "") -> dict[str, Any]:
        """Decode, run, encode. Never raises: every outcome is an AgentResult dict."""
        started = time.time()
        try:
            if kwargs or len(args) != 1:
                raise errors.InvalidTask(
                    f"expected one task message argument, got {len(args)} positional and "
                    f"{len(kwargs)} keyword arguments"
                )
            message = TaskMessage.model_validate(args[0])
        except ValidationError as e:
            return self._invalid(task_id, started, describe_validation_error(e))
        except errors.InvalidTask as e:
            return self._invalid(task_id, started, e.message)
        deadline_s = self.settings.deadline_for(message.task.timeout_s)
        deadline_at, delivery = self.store.begin(task_id, deadline_s, worker)
        ctx = TaskContext(
            task_id=task_id,
            message=message,
            started_at=started,
            deadline_at=deadline_at,
            on_state=lambda **fields: self._state(task_id, fields),
        )
        result = self.pipeline.run(ctx)
        self._finish(task_id, result)
        log.info("task %s %s after %d attempt(s)%s", task_id, result.status.value,
                 result.attempts, f" ({result.error.category.value})" if result.error else "")
        return result.model_dump(mode="json")

    def _invalid(self, task_id: str, started: float, why: str) -> dict[str, Any]:
        log.warning("task %s refused: invalid message: %s", task_id, why)
        err = errors.InvalidTask(f"invalid task message: {why}")
        result = AgentResult(task_id=task_id, status=TaskStatus.FAILED, error=err.to_error(),
                             simulated=self.settings.provider == "sim")
        result.timings.total_s = time.time() - started
        self._finish(task_id, result)
        return result.model_dump(mode="json")

    def _state(self, task_id: str, fields: dict[str, Any]) -> None:
        try:
            self.store.update(task_id, **fields)
        except redis.RedisError as e:  # progress bookkeeping must not fail the task
            log.warning("task %s: could not record state: %s", task_id, e)

    def _finish(self, task_id: str, result: AgentResult) -> None:
        self._state(task_id, {"status": result.status,
                              "error": result.error.category.value if result.error else None})


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(load_settings())
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """For tests and embedding: replace the process's runtime."""
    global _runtime
    with _lock:
        _runtime = runtime
