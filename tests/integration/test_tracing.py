"""One trace per task, producer and worker spans joined through the task message.

The producer is the real `Client` on a real redis-server; the worker is a real `Runtime`
(sim sandboxes) run in this process on the very messages the producer published, popped
from the Celery queue as a worker's consumer would take them. In-process because the
spans must reach one in-memory exporter: what joins them is only the trace context the
message carries, and that travels through Redis exactly as between two machines (a
subprocess worker would add nothing to that but a file exporter to parse). The messages
are signed, so the test also shows the context does not break signatures.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sandqueue import tracing
from sandqueue.contract import AgentResult
from sandqueue.settings import Settings
from tests.integration.conftest import close_client, make_client
from worker.runtime import Runtime

SIGNING = "trace-test-signing-key"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    tracing.setup("off", "sandqueue-test", exporter=spans)
    yield spans
    tracing.reset()


def _take(rdb: redis.Redis, queue: str = "sandqueue") -> tuple[str, list[Any]]:
    """The next message a worker would take: (task id, positional args)."""
    raw = rdb.rpop(queue)
    assert raw is not None, "the producer published nothing"
    message = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["id"], args


def _worker(redis_url: str) -> Runtime:
    settings = Settings(_env_file=None, redis_url=redis_url, sandbox="sim",  # type: ignore[call-arg]
                        backoff_scale=0, sim_create_latency_s=0, sim_latency_s=0.02,
                        signing_keys=SIGNING)
    runtime = Runtime(settings, worker_name="w-trace")
    runtime.start_maintenance = lambda: None  # type: ignore[method-assign]
    return runtime


def test_each_task_is_one_trace_from_submit_through_its_attempts(
        exporter: InMemorySpanExporter, redis_url: str, rdb: redis.Redis) -> None:
    client = make_client(redis_url, signing_keys=SIGNING)
    try:
        handles = client.submit_many([
            client.prepare("plain", labels={"tenant": "acme"}),
            client.prepare("flaky", labels={"tenant": "acme"},
                           envs={"SIM_FAIL": "agent:overloaded:1"}),
            client.prepare("other", labels={"tenant": "beta"})])
    finally:
        close_client(client)
    worker = _worker(redis_url)
    results = {}
    for _ in handles:
        task_id, args = _take(rdb)
        assert "trace" in args[0] and "sig" in args[0]
        results[task_id] = AgentResult.model_validate(worker.handle(task_id, tuple(args), {}))
    assert all(r.ok for r in results.values()), "signatures held with the trace context"
    traces: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in exporter.get_finished_spans():
        traces[span.context.trace_id].append(span)
    assert len(traces) == len(handles), "one trace per task"
    for spans in traces.values():
        check_trace(spans, results)


def check_trace(spans: list[ReadableSpan], results: dict[str, AgentResult]) -> None:
    by_name: dict[str, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        by_name[span.name].append(span)
    (submit,) = by_name["sandqueue.submit"]
    task_id = submit.attributes["sandqueue.task_id"]
    result = results[task_id]
    assert submit.parent is None, "the producer's span is the trace's root"
    (task,) = by_name["sandqueue.task"]
    (queued,) = by_name["sandqueue.queued"]
    assert task.parent.span_id == queued.parent.span_id == submit.context.span_id
    attrs = task.attributes
    assert attrs["sandqueue.task_id"] == task_id
    assert attrs["sandqueue.tenant"] == result.labels["tenant"]
    assert attrs["sandqueue.sandbox_id"] == result.sandbox_id
    assert attrs["sandqueue.agent_session_id"] == result.session_id is not None
    assert attrs["sandqueue.cost_usd"] == result.total_cost_usd
    attempts = sorted(by_name["sandqueue.attempt"], key=lambda s: s.start_time)
    assert len(attempts) == result.attempts
    assert [a.attributes["sandqueue.outcome"] for a in attempts] == \
        [e.outcome for e in result.attempt_log]
    for name in ("sandqueue.sandbox_create", "sandqueue.agent_run"):
        assert sorted(s.parent.span_id for s in by_name[name]) == \
            sorted(a.context.span_id for a in attempts), name
    for attempt in attempts:
        assert attempt.parent.span_id == task.context.span_id
        assert task.start_time <= attempt.start_time <= attempt.end_time <= task.end_time


def test_tracing_off_sets_nothing_up_and_sends_nothing() -> None:
    """Off (the default): no tracer provider, no span processor or exporter loaded, no
    exporter thread, so nothing can be sent; the message carries no trace context. (redis-py
    imports parts of the OpenTelemetry SDK for its own optional metrics; not the trace SDK.)"""
    probe = ("import sys, json, threading\n"
             "import producer.cli, worker.broker.app\n"
             "from producer.api import Client\n"
             "from sandqueue import tracing\n"
             "from sandqueue.settings import Settings\n"
             "from opentelemetry import trace\n"
             "c = Client(Settings(_env_file=None))\n"
             "body = c._body('t', c.prepare('x'), 0.0)\n"
             "print(json.dumps({'enabled': tracing.enabled(), 'body': body,\n"
             "  'provider': type(trace.get_tracer_provider()).__name__,\n"
             "  'threads': [t.name for t in threading.enumerate()],\n"
             "  'sdk': sorted(m for m in sys.modules if m.startswith(\n"
             "      ('opentelemetry.sdk.trace', 'opentelemetry.exporter')))}))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"enabled": False, "body": {"task": {"prompt": "x"}, "submitted_at": 0.0},
                      "provider": "ProxyTracerProvider", "threads": ["MainThread"], "sdk": []}
