"""What a worker tells the outside about its tasks, besides their records and events.

The pipeline already reports every phase through two hooks of its `TaskContext`: progress
events (`sandbox_created`, `gateway_ready`, `agent_started`, `retrying`, ...) and attempt
records (when an attempt starts, gets a sandbox, starts its agent, ends). The observer wraps
those two hooks, so the pipeline needs no code of its own for it, and the runtime tells it
the result. From them it makes:

- fleet-wide counters in Redis (`sq:stats:*`: sandboxes created, 429s), which
  `sandqueue/fleet.py` turns into rates for the dashboard and the fleet gauges;
- this process's Prometheus metrics (`sandqueue/metrics.py`);
- when tracing is on, the worker's spans of the task's trace (`sandqueue/tracing.py`):
  `sandqueue.queued`, and per delivery `sandqueue.task` with one `sandqueue.attempt` per
  attempt, whose children are `sandqueue.sandbox_create`, `sandqueue.gateway_ready` and
  `sandqueue.agent_run`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandqueue import keys, metrics, tracing
from sandqueue.contract import AgentResult, AttemptRecord
from sandqueue.settings import Settings
from worker.pipeline import TaskContext
from worker.writebehind import WriteBehind

log = logging.getLogger(__name__)

STATS_TTL_S = 600
"""A counter window outlives the minute the fleet view reads by a wide margin."""

ENDS_DELIVERY = frozenset({"handed_back", "worker_lost"})
"""Attempt outcomes after which this delivery stores no result (the task lives on)."""


@dataclass
class _Watch:
    """One delivery of a task, as the observer follows it."""

    task_id: str
    tenant: str | None
    sandbox_at: float | None = None
    agent_at: float | None = None
    task_span: Any = None
    attempt_span: Any = None
    spans: dict[str, Any] = field(default_factory=dict)
    """Open phase spans of the current attempt, by name."""


class Observer:
    def __init__(self, writer: WriteBehind) -> None:
        self.writer = writer
        self._watches: dict[str, _Watch] = {}
        self._windows: dict[str, str] = {}
        """The counter key each stats name last went to (its expiry is set once)."""
        self._lock = threading.Lock()

    def watch(self, ctx: TaskContext) -> None:
        """Wrap the context's event and attempt hooks (the originals still run first)."""
        on_event, on_attempt = ctx.on_event, ctx.on_attempt
        message = ctx.message
        w = _Watch(ctx.task_id, message.task.labels.get("tenant") if message else None)
        if tracing.enabled() and message is not None:
            self._start_trace(w, ctx)
        with self._lock:
            self._watches[ctx.task_id] = w

        def event(data: dict[str, Any]) -> None:
            on_event(data)
            self._event(w, data)

        def attempt(entry: AttemptRecord) -> None:
            on_attempt(entry)
            self._attempt(w, entry)

        ctx.on_event, ctx.on_attempt = event, attempt

    # -- the hooks -----------------------------------------------------------------------
    def _event(self, w: _Watch, data: dict[str, Any]) -> None:
        phase = data.get("phase")
        now = time.time()
        if phase == "sandbox_created":
            self.count("creates")
            metrics.SANDBOX_CREATIONS.inc()
            create_s = data.get("create_s")
            if isinstance(create_s, int | float):
                metrics.PHASE_SECONDS.labels(phase="sandbox_create").observe(create_s)
                self._span(w, "sandqueue.sandbox_create", now - create_s, now,
                           {"sandqueue.sandbox_id": data.get("sandbox_id", "")})
            if w.attempt_span is not None:
                w.attempt_span.set_attribute("sandqueue.sandbox_id", data.get("sandbox_id", ""))
            w.sandbox_at = now
        elif phase == "gateway_ready" and w.sandbox_at is not None:
            metrics.PHASE_SECONDS.labels(phase="gateway_ready").observe(now - w.sandbox_at)
            self._span(w, "sandqueue.gateway_ready", w.sandbox_at, now)
        elif phase == "agent_started":
            w.agent_at = now
            if w.attempt_span is not None:
                w.spans["agent"] = self._open(w, "sandqueue.agent_run", now)

    def _attempt(self, w: _Watch, entry: AttemptRecord) -> None:
        if entry.ended_at is None:
            if entry.outcome == "running" and w.attempt_span is None and w.task_span is not None:
                w.attempt_span = self._open(w, "sandqueue.attempt", entry.started_at,
                                            parent=w.task_span, attempt=entry.attempt)
            return
        if entry.outcome == "rate_limited":
            self.count("rate_limited")
            metrics.RATE_LIMITED.inc()
        metrics.ATTEMPTS.labels(outcome=entry.outcome,
                                retried=str(entry.retried).lower()).inc()
        if w.agent_at is not None:
            metrics.PHASE_SECONDS.labels(phase="agent_run").observe(entry.ended_at - w.agent_at)
        self._close_attempt(w, entry)
        w.sandbox_at = w.agent_at = None
        if entry.outcome in ENDS_DELIVERY:
            with self._lock:
                self._watches.pop(w.task_id, None)
            self._end_task(w, None)

    def finished(self, task_id: str, result: AgentResult) -> None:
        """The delivery ended with this result (stored as the task's outcome)."""
        with self._lock:
            w = self._watches.pop(task_id, None)
        error = result.error.category.value if result.error else ""
        metrics.TASKS_FINISHED.labels(status=result.status.value, error=error).inc()
        for phase in ("queued", "total"):
            value = getattr(result.timings, f"{phase}_s")
            if value is not None:
                metrics.PHASE_SECONDS.labels(phase=phase).observe(value)
        tenant = metrics.tenant_label(result.labels.get("tenant"))
        if result.total_cost_usd:
            metrics.COST_USD.labels(tenant=tenant).inc(result.total_cost_usd)
        for name, kind in metrics.TOKEN_KINDS.items():
            value = result.usage.get(name)
            if isinstance(value, int) and value > 0:
                metrics.TOKENS.labels(tenant=tenant, kind=kind).inc(value)
        if w is not None:
            self._end_task(w, result)

    def count(self, name: str) -> None:
        """One more in this window's fleet-wide counter (batched with the progress writes;
        its expiry set by the first count of each window in this process)."""
        key = keys.stats(name, int(time.time() // keys.STATS_WINDOW_S))
        with self._lock:
            first = self._windows.get(name) != key
            self._windows[name] = key

        def write(pipe: Any) -> None:
            pipe.incr(key)
            if first:
                pipe.expire(key, STATS_TTL_S)

        self.writer.submit(write)

    # -- spans ---------------------------------------------------------------------------
    def _start_trace(self, w: _Watch, ctx: TaskContext) -> None:
        tracer = tracing.tracer()
        parent = tracing.parent(ctx.message.trace)
        attributes = {"sandqueue.task_id": ctx.task_id, "sandqueue.tenant": w.tenant or "",
                      "sandqueue.worker": ctx.worker or "",
                      "sandqueue.delivery": ctx.delivery or 0}
        if (ctx.delivery or 1) == 1:  # waiting in the queue, once per task
            tracer.start_span("sandqueue.queued", context=parent, attributes=attributes,
                              start_time=tracing.ns(ctx.message.submitted_at)).end(
                                  end_time=tracing.ns(max(ctx.started_at,
                                                          ctx.message.submitted_at)))
        w.task_span = tracer.start_span("sandqueue.task", context=parent, attributes=attributes,
                                        start_time=tracing.ns(ctx.started_at))

    def _open(self, w: _Watch, name: str, start: float | None, parent: Any = None,
              **attributes: Any) -> Any:
        from opentelemetry import trace

        context = trace.set_span_in_context(parent or w.attempt_span)
        attrs = {"sandqueue.task_id": w.task_id,
                 **{f"sandqueue.{k}": v for k, v in attributes.items()}}
        return tracing.tracer().start_span(name, context=context, attributes=attrs,
                                           start_time=tracing.ns(start or time.time()))

    def _span(self, w: _Watch, name: str, start: float, end: float,
              attributes: dict[str, Any] | None = None) -> None:
        if w.attempt_span is None:
            return
        span = self._open(w, name, start)
        for key, value in (attributes or {}).items():
            span.set_attribute(key, value)
        span.end(end_time=tracing.ns(end))

    def _close_attempt(self, w: _Watch, entry: AttemptRecord) -> None:
        end = tracing.ns(entry.ended_at or time.time())
        for span in w.spans.values():
            span.end(end_time=end)
        w.spans.clear()
        if w.attempt_span is not None:
            w.attempt_span.set_attribute("sandqueue.outcome", entry.outcome)
            w.attempt_span.set_attribute("sandqueue.retried", entry.retried)
            if entry.error:
                w.attempt_span.set_attribute("sandqueue.error", entry.error[:500])
            w.attempt_span.end(end_time=end)
            w.attempt_span = None

    def _end_task(self, w: _Watch, result: AgentResult | None) -> None:
        span, w.task_span = w.task_span, None
        if span is None:
            return
        if result is not None:
            span.set_attribute("sandqueue.status", result.status.value)
            for key, value in (("sandbox_id", result.sandbox_id),
                               ("agent_session_id", result.session_id),
                               ("cost_usd", result.total_cost_usd),
                               ("error", result.error.category.value if result.error else None)):
                if value is not None:
                    span.set_attribute(f"sandqueue.{key}", value)
            span.set_attribute("sandqueue.attempts", result.attempts)
        else:
            span.set_attribute("sandqueue.status", "handed_back")
        span.end()


def start_telemetry(settings: Settings, in_flight: Callable[[], int]) -> None:
    """This worker process's metrics port and tracing, as the settings ask (both off by
    default). Called once, when the worker is ready."""
    metrics.tenant_label.limit = settings.metrics_max_tenants
    metrics.IN_FLIGHT.set_function(in_flight)
    tracing.setup(settings.tracing, "sandqueue-worker", settings.tracing_endpoint)
    if not settings.metrics_port:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(settings.metrics_port, settings.metrics_host,
                          registry=metrics.REGISTRY)
    except OSError as e:
        # Logged, not raised: a worker without its metrics port still runs its tasks (and
        # the rest of its start-up, e.g. webhook deliveries, must not be skipped).
        log.error("SANDQUEUE_METRICS_PORT %d on %s: cannot listen (%s); this worker serves "
                  "no metrics. Each worker process on a host needs its own port",
                  settings.metrics_port, settings.metrics_host, e)
        return
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
