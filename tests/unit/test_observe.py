"""The worker's observer, on the real pipeline with sim sandboxes: the phases it times (the
MCP gateway included), and a delivery handed back ends its span and is forgotten."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sandqueue import errors, metrics, tracing
from sandqueue.contract import AgentTask, TaskMessage
from sandqueue.settings import Settings
from worker.agent.claude_code import ClaudeCodeAgent
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.observe import Observer
from worker.pipeline import Pipeline, TaskContext
from worker.sandbox.sim import SimProvider
from worker.writebehind import WriteBehind

NOTION = {"notion": {"internalIntegrationToken": "${NOTION_TOKEN}"}}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.setup("off", "test", exporter=exporter)
    yield exporter
    tracing.reset()


def _run(observer: Observer, task: AgentTask, *, stop: bool = False) -> TaskContext:
    settings = Settings(_env_file=None, backoff_scale=0, sim_create_latency_s=0.05,  # type: ignore[call-arg]
                        sim_latency_s=0.05)
    pipeline = Pipeline(settings, SimProvider(settings), ClaudeCodeAgent(),
                        environ={"NOTION_TOKEN": "ntn_x"},
                        runner=AgentRunner(Watchdog(tick_s=0.02), stall_timeout_s=2))
    now = time.time()
    ctx = TaskContext(task_id=f"t-{now}", message=TaskMessage(task=task, submitted_at=now - 2),
                      started_at=now, deadline_at=now + 60, worker="w", delivery=1)
    observer.watch(ctx)
    if stop:
        ctx.stop.set()
        with pytest.raises(errors.WorkerStopping):
            pipeline.run(ctx)
    else:
        observer.finished(ctx.task_id, pipeline.run(ctx))
    return ctx


def _count(phase: str) -> float:
    return metrics.REGISTRY.get_sample_value("sandqueue_phase_seconds_count",
                                             {"phase": phase}) or 0.0


def test_every_phase_is_timed_and_spanned(spans: InMemorySpanExporter) -> None:
    before = {p: _count(p) for p in ("sandbox_create", "gateway_ready", "agent_run", "queued")}
    observer = Observer(WriteBehind(fakeredis.FakeRedis()))
    _run(observer, AgentTask(prompt="hi", mcp=NOTION, labels={"tenant": "acme"}))
    assert {p: _count(p) - n for p, n in before.items()} == {
        "sandbox_create": 1, "gateway_ready": 1, "agent_run": 1, "queued": 1}
    by_name: dict[str, Any] = {s.name: s for s in spans.get_finished_spans()}
    attempt = by_name["sandqueue.attempt"]
    for name in ("sandqueue.sandbox_create", "sandqueue.gateway_ready", "sandqueue.agent_run"):
        assert by_name[name].parent.span_id == attempt.context.span_id, name
    create = by_name["sandqueue.sandbox_create"]
    # at least the sim's creation latency (0.05 s; the event rounds it to the millisecond)
    assert (create.end_time - create.start_time) / 1e9 >= 0.049
    queued = by_name["sandqueue.queued"]
    assert (queued.end_time - queued.start_time) / 1e9 == pytest.approx(2, abs=0.01)
    assert by_name["sandqueue.task"].attributes["sandqueue.status"] == "succeeded"
    assert observer._watches == {}


def test_a_delivery_handed_back_ends_its_span_and_is_forgotten(
        spans: InMemorySpanExporter) -> None:
    observer = Observer(WriteBehind(fakeredis.FakeRedis()))
    _run(observer, AgentTask(prompt="hi"), stop=True)
    task = next(s for s in spans.get_finished_spans() if s.name == "sandqueue.task")
    assert task.attributes["sandqueue.status"] == "handed_back"
    attempt = next(s for s in spans.get_finished_spans() if s.name == "sandqueue.attempt")
    assert attempt.attributes["sandqueue.outcome"] == "handed_back"
    assert observer._watches == {}, "nothing kept for a delivery that stored no result"


def test_without_tracing_the_observer_keeps_nothing_after_a_task() -> None:
    observer = Observer(WriteBehind(fakeredis.FakeRedis()))
    assert not tracing.enabled()
    ctx = _run(observer, AgentTask(prompt="hi"))
    assert observer._watches == {} and ctx.task_id


def test_a_metrics_port_in_use_is_said_and_the_worker_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from worker.observe import start_telemetry

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(_env_file=None, metrics_port=port)  # type: ignore[call-arg]
        start_telemetry(settings, lambda: 3)  # returns: the worker's start-up goes on
    assert metrics.REGISTRY.get_sample_value("sandqueue_tasks_in_flight") == 3
    (record,) = [r for r in caplog.records if "SANDQUEUE_METRICS_PORT" in r.getMessage()]
    assert record.levelname == "ERROR" and str(port) in record.getMessage()
    assert "its own port" in record.getMessage()
