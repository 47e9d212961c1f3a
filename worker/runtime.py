"""Per-process state of a worker, and the handling of one delivery.

Built lazily on first use (after any fork) and shared by every thread of the pool: threads
share one Redis pool instead of opening connections each. `handle` is what the Celery task
calls: decode, de-duplicate deliveries, apply the side-effect rule to re-deliveries, run the
pipeline under a lease, record and return the result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import redis
from pydantic import ValidationError

from sandqueue import errors, keys, signing
from sandqueue.contract import (
    AgentResult,
    AttemptRecord,
    TaskMessage,
    TaskStatus,
    ToolCallCount,
)
from sandqueue.events import EventLog
from sandqueue.settings import Settings
from sandqueue.store import Begin, NotMine, TaskStore
from worker.agent import make_agent
from worker.credentials import resolve_mcp
from worker.limits import WAKE, Limiter
from worker.maintenance import Maintenance
from worker.observe import Observer
from worker.pipeline import Pipeline, TaskContext
from worker.sandbox import make_provider
from worker.writebehind import WriteBehind

log = logging.getLogger(__name__)

STEP_ASIDE_AFTER_S = 0.5
"""How long a task over a per-key limit waits for a slot before going to the queue's back."""

LOST_ATTEMPT = ("its worker stopped renewing the task's lease during this attempt (killed, or "
                "cut off from Redis); the task was put back on the queue")


class Duplicate(Exception):
    """This delivery must not run (a copy of a task that runs or has finished): acknowledge
    it and store nothing."""


class HandBack(Exception):
    """Put this delivery back on the queue for another worker (this one stops, or the task
    is over a per-key limit)."""


class Runtime:
    def __init__(self, settings: Settings, worker_name: str | None = None, *,
                 result_exists: Callable[[str], bool] | None = None,
                 recover: Callable[[], object] | None = None) -> None:
        """`result_exists` and `recover` come from the broker side (worker/broker/): the
        runtime itself knows nothing of Celery."""
        self.settings = settings
        self.result_exists = result_exists
        self.recover = recover
        self.worker_name = worker_name or f"{socket.gethostname()}:{id(self):x}"
        self.queues: list[str] = []
        """The queues this worker consumes (set when Celery says it is ready)."""
        self._active: dict[str, TaskContext] = {}
        self._delivering: set[str] = set()
        self._lock = threading.Lock()
        self._maintenance: Maintenance | None = None

    @cached_property
    def redis(self) -> redis.Redis:
        # One pool for all threads, sized for them (redis-py's default of 100 connections
        # fails at high concurrency); a thread waits for a free connection, never errors.
        pool = redis.BlockingConnectionPool.from_url(
            self.settings.redis_url, max_connections=self.settings.concurrency * 2 + 20,
            timeout=30, socket_connect_timeout=5, socket_timeout=30, retry_on_timeout=True,
            health_check_interval=25)
        return redis.Redis(connection_pool=pool)

    @cached_property
    def store(self) -> TaskStore:
        return TaskStore(self.redis, self.settings.result_expires_s)

    @cached_property
    def writer(self) -> WriteBehind:
        return WriteBehind(self.redis)

    @cached_property
    def events(self) -> EventLog:
        return EventLog(self.redis, self.settings.events_max_len, self.settings.result_expires_s)

    @cached_property
    def limiter(self) -> Limiter:
        return Limiter(self.redis, self.settings)

    @cached_property
    def observer(self) -> Observer:
        return Observer(self.writer)

    @cached_property
    def pipeline(self) -> Pipeline:
        provider = make_provider(self.settings, self.redis, self.writer)
        return Pipeline(self.settings, provider, make_agent(self.settings),
                        limiter=self.limiter)

    # -- process lifecycle ---------------------------------------------------------------
    def start_maintenance(self) -> None:
        with self._lock:
            if self._maintenance is None:
                self._maintenance = self.new_maintenance()
            self._maintenance.start()

    def new_maintenance(self) -> Maintenance:
        return Maintenance(self.settings, self.redis, self.store, self.limiter,
                           worker_name=self.worker_name, queues=self.queues,
                           active=self.active_contexts, recover=self.recover,
                           provider=lambda: self.pipeline.provider)

    def active_contexts(self) -> dict[str, TaskContext]:
        with self._lock:
            return dict(self._active)

    def shutdown(self, grace_s: float | None = None) -> None:
        """On SIGTERM: let running tasks finish for the grace period, then hand them back."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s

        def stop_after_grace() -> None:
            end = time.monotonic() + grace
            while self.active_contexts() and time.monotonic() < end:
                time.sleep(0.2)
            for task_id, ctx in self.active_contexts().items():
                log.warning("task %s: worker stopping; handing the task back", task_id)
                ctx.stop.set()

        threading.Thread(target=stop_after_grace, name="sandqueue-shutdown", daemon=True).start()

    # -- one delivery --------------------------------------------------------------------
    def handle(self, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decode, run, encode. Every outcome is an AgentResult dict, except two:
        a duplicate delivery raises `Duplicate` (acknowledged, nothing stored) and a worker
        stop raises `HandBack` (back on the queue for another worker)."""
        started = time.time()
        try:
            message = self._decode(args, kwargs)
            refused = signing.verify(self.settings.signing_keys_value, task_id, args[0])
            if refused is not None:
                raise errors.InvalidTask(refused)
        except errors.InvalidTask as e:
            return self._invalid(task_id, started, e.message)
        self.start_maintenance()
        slots_holder = self._take_key_slots(task_id, message)
        try:
            with self._in_hand(task_id):
                return self._deliver(task_id, message, started)
        finally:
            if slots_holder:
                self.limiter.release(slots_holder)

    @contextmanager
    def _in_hand(self, task_id: str) -> Iterator[None]:
        """One delivery of a task at a time in this process. The lease stops other workers,
        but a second copy of a message (a producer republishing a task it could not confirm)
        can reach this same worker while it runs the first, under the same lease owner."""
        with self._lock:
            if task_id in self._delivering:
                log.info("task %s: duplicate delivery ignored: this worker is running it",
                         task_id)
                raise Duplicate()
            self._delivering.add(task_id)
        try:
            yield
        finally:
            with self._lock:
                self._delivering.discard(task_id)

    def _take_key_slots(self, task_id: str, message: TaskMessage) -> str | None:
        """Per-key limits (tenant, credential, ...): wait a moment for a slot, else step
        aside to the back of the queue so tasks of other keys run meanwhile. Checked
        before the task's deadline starts: waiting in line does not eat into it."""
        if not self.limiter.key_limits:
            return None
        try:
            _, secrets = resolve_mcp(message.task.mcp, os.environ, self.pipeline.sealer)
        except errors.SandqueueError:
            secrets = []  # the pipeline reports the configuration error itself
        slots = self.limiter.task_slots(message.task, secrets)
        holder = f"task:{task_id}"
        if not slots:
            return None
        # Hold the thread only briefly: a tenant's backlog must cycle past quickly enough
        # that other tenants' tasks behind it get their turn within seconds.
        end = time.monotonic() + STEP_ASIDE_AFTER_S
        while (wait_s := self.limiter.try_acquire(holder, slots, rate=False)) > 0:
            left = end - time.monotonic()
            if left <= 0:
                # At once, and only if it has not ended: a producer may cancel it now.
                self.store.requeued(task_id, "throttled_at")
                raise HandBack("over a per-key limit; back of the queue")
            self.redis.blpop([WAKE], timeout=max(0.05, min(wait_s, left)))
        return holder

    def _deliver(self, task_id: str, message: TaskMessage, started: float) -> dict[str, Any]:
        task = message.task
        deadline_s = self.settings.deadline_for(task.timeout_s)
        begin = self.store.begin(task_id, deadline_s, self.worker_name,
                                 self.settings.lease_ttl_s)
        if isinstance(begin, NotMine):
            if begin.final_status == TaskStatus.CANCELLED and not self._has_result(task_id):
                # Cancelled while queued by a producer that died before storing the result.
                log.info("task %s: cancelled before it started", task_id)
                return self._cancelled_before_start(task_id, message)
            log.info("task %s: duplicate delivery ignored: %s", task_id, begin.reason)
            raise Duplicate()
        ctx = self._context(task_id, message, started, begin)
        ctx.timeout_s_applied = deadline_s
        if task.timeout_s is not None and task.timeout_s > deadline_s:
            ctx.warnings.append(
                f"timeout_s {task.timeout_s:g} is above this worker's SANDQUEUE_MAX_TIMEOUT_S "
                f"({self.settings.max_timeout_s:g}s): the task ran with a {deadline_s:g}s "
                "deadline")
            log.warning("task %s: %s", task_id, ctx.warnings[-1])
        with self._lock:
            self._active[task_id] = ctx
        try:
            result = self._run(ctx, begin)
        except errors.WorkerStopping:
            if ctx.lease_lost.is_set():
                # Another worker took the task over (its message was already put back).
                log.warning("task %s: lease lost; this run stops, the task lives on", task_id)
                self.writer.sync()
                raise Duplicate() from None
            self._state(task_id, {"status": TaskStatus.QUEUED, "handed_back_at": time.time()})
            self.writer.submit(lambda p: self.store.release_lease(task_id, self.worker_name, p))
            self._event(task_id, {"phase": "handed_back"})
            self.writer.sync()
            raise HandBack("worker stopping") from None
        finally:
            with self._lock:
                self._active.pop(task_id, None)
        self._finish(task_id, result)
        return result.model_dump(mode="json")

    def _has_result(self, task_id: str) -> bool:
        return True if self.result_exists is None else self.result_exists(task_id)

    def _cancelled_before_start(self, task_id: str, message: TaskMessage) -> dict[str, Any]:
        result = AgentResult(
            task_id=task_id, status=TaskStatus.CANCELLED, labels=message.task.labels,
            error=errors.Cancelled("the task was cancelled before it started").to_error(),
            simulated=self.settings.provider == "sim")
        self._event(task_id, {"phase": "result", "status": "cancelled", "error": "cancelled"})
        self.writer.sync()
        self.observer.finished(task_id, result)
        return result.model_dump(mode="json")

    @staticmethod
    def _decode(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskMessage:
        if kwargs or len(args) != 1:
            raise errors.InvalidTask(
                f"expected one task message argument, got {len(args)} positional and "
                f"{len(kwargs)} keyword arguments"
            )
        try:
            return TaskMessage.model_validate(args[0])
        except ValidationError as e:
            raise errors.InvalidTask(errors.describe(e, "message")) from e

    def _context(self, task_id: str, message: TaskMessage, started: float,
                 begin: Begin) -> TaskContext:
        first_attempt = [begin.attempt]  # counted by begin; later ones by the store

        def next_attempt() -> int:
            return first_attempt.pop() if first_attempt else self.store.next_attempt(task_id)

        ctx = TaskContext(
            task_id=task_id,
            message=message,
            started_at=started,
            deadline_at=begin.deadline_at,
            on_state=lambda **fields: self._state(task_id, fields),
            on_event=lambda event: self._event(task_id, event),
            # Durable at once: after a crash the side-effect rule depends on it.
            on_tool_call=lambda name: self._safe(self.store.record_tool_call, task_id, name),
            next_attempt=next_attempt,
            on_attempt=lambda entry: self._state(task_id, self.store.attempt_values(entry)),
            attempt_log=self._history(task_id, begin),
            worker=self.worker_name,
            delivery=begin.delivery,
        )
        if begin.cancel_requested:
            ctx.cancel.set()
        self.observer.watch(ctx)
        return ctx

    def _history(self, task_id: str, begin: Begin) -> list[AttemptRecord]:
        """The attempts of earlier deliveries. One still `running` died with its worker
        (this delivery holds the lease now), as did a number with no record at all (the
        worker died before its record was written)."""
        if begin.delivery <= 1:
            return []
        try:
            entries = {e.attempt: e for e in self.store.attempt_log(self.store.get(task_id))}
        except redis.RedisError as e:  # the log is an account, not a guarantee
            log.warning("task %s: could not read its attempt log: %s", task_id, e)
            return []
        for n in range(1, begin.attempt):
            entry = entries.setdefault(n, AttemptRecord(attempt=n))
            if entry.outcome == "running":
                entry.outcome, entry.error = "worker_lost", LOST_ATTEMPT
        return [entries[n] for n in sorted(entries)]

    @staticmethod
    def _settle_lost(ctx: TaskContext, retried: bool) -> None:
        """Record the attempts a dead worker left, now that we know if they are retried."""
        for entry in ctx.attempt_log:
            if entry.outcome == "worker_lost" and entry.ended_at is None:
                entry.retried = retried
                ctx.on_attempt(entry)

    def _run(self, ctx: TaskContext, begin: Begin) -> AgentResult:
        task = ctx.message.task
        started: dict[str, Any] = {"phase": "started", "delivery": begin.delivery,
                                   "worker": self.worker_name}
        if ctx.warnings:
            started["warnings"] = list(ctx.warnings)
        ctx.on_event(started)
        if ctx.cancel.is_set():
            self._settle_lost(ctx, retried=False)
            return self._ended(ctx, begin,
                               errors.Cancelled("the task was cancelled before it started"))
        if begin.delivery > 1 and begin.tool_calls and not task.retry.retry_after_side_effects:
            self._settle_lost(ctx, retried=False)
            return self._ended(ctx, begin, errors.WorkerLost(
                f"the worker running this task stopped after the agent had made "
                f"{begin.tool_calls} tool call(s); not run again because their effects could "
                "repeat (set retry.retry_after_side_effects to allow it)"
            ), record=self.store.get(ctx.task_id))
        self._settle_lost(ctx, retried=True)
        return self.pipeline.run(ctx)

    def _ended(self, ctx: TaskContext, begin: Begin, error: errors.SandqueueError,
               record: dict[str, str] | None = None) -> AgentResult:
        """A result for a task that ends without running, keeping recorded progress."""
        record = record or {}
        status = TaskStatus.CANCELLED if isinstance(error, errors.Cancelled) else TaskStatus.FAILED
        result = AgentResult(
            task_id=ctx.task_id, status=status, error=error.to_error(),
            result=record.get("last_text"),
            attempts=begin.attempt - 1,  # begin counted one that never ran
            attempt_log=list(ctx.attempt_log),
            sandbox_id=record.get("sandbox_id"),
            tool_calls=[ToolCallCount(name=n, count=c)
                        for n, c in self.store.tool_counts(record).items()],
            total_cost_usd=float(record["cost_usd"]) if record.get("cost_usd") else None,
            simulated=self.pipeline.provider.simulated,
            labels=ctx.message.task.labels,
            timeout_s_requested=ctx.message.task.timeout_s,
            timeout_s_applied=ctx.timeout_s_applied,
            warnings=list(ctx.warnings),
        )
        result.timings.queued_s = max(0.0, ctx.started_at - ctx.message.submitted_at)
        result.timings.total_s = time.time() - ctx.started_at
        return result

    def _invalid(self, task_id: str, started: float, why: str) -> dict[str, Any]:
        log.warning("task %s refused: invalid message: %s", task_id, why)
        result = self.invalid_result(task_id, why)
        result["timings"]["total_s"] = time.time() - started
        return result

    def invalid_result(self, task_id: str, why: str) -> dict[str, Any]:
        """The stored answer to a message that is not a valid task: data, never a pickle."""
        err = errors.InvalidTask(f"invalid task message: {why}")
        result = AgentResult(task_id=task_id, status=TaskStatus.FAILED, error=err.to_error(),
                             simulated=self.settings.provider == "sim")
        self._finish(task_id, result)
        return result.model_dump(mode="json")

    def _safe(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except redis.RedisError as e:  # bookkeeping must not fail the task
            log.warning("could not record progress: %s", e)

    def _state(self, task_id: str, fields: dict[str, Any]) -> None:
        self.writer.hset(keys.task(task_id), self.store.values(**fields),
                         self.settings.result_expires_s)

    def _event(self, task_id: str, event: dict[str, Any]) -> None:
        self.writer.xadd(keys.events(task_id), self.events.entry(event),
                         self.settings.events_max_len, self.settings.result_expires_s)

    def _finish(self, task_id: str, result: AgentResult) -> None:
        """Final state, lease and `result` event, visible before the result is stored."""
        category = result.error.category.value if result.error else None
        self._state(task_id, {"status": result.status, "error": category,
                              "cost_usd": result.total_cost_usd})
        self.writer.submit(lambda p: self.store.release_lease(task_id, self.worker_name, p))
        tenant = result.labels.get("tenant")
        if tenant:  # the HTTP API's per-key limit of unfinished tasks counts this one no more
            self.writer.submit(lambda p: p.zrem(keys.tenant_open(tenant), task_id))
        self._event(task_id, {"phase": "result", "status": result.status.value,
                              "error": category})
        if not self.writer.sync():
            log.warning("task %s: progress writes are behind (is Redis slow?)", task_id)
        self.observer.finished(task_id, result)
        log.info("task %s %s after %d attempt(s)%s", task_id, result.status.value,
                 result.attempts, f" ({result.error.category.value})" if result.error else "")
