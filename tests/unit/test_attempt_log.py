"""Results say why an attempt was repeated and whether its sandbox was killed (issue 8.20).

The pipeline on the sim provider, and one delivery through `Runtime.handle` on fakeredis
(the attempt log lives in the task's record so that it survives a worker's death).
"""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis
import pytest

from sandqueue import errors, keys
from sandqueue.contract import AgentResult, AgentTask, AttemptRecord, TaskMessage
from sandqueue.settings import Settings
from sandqueue.store import TaskStore
from worker.agent.claude_code import ClaudeCodeAgent
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.pipeline import Pipeline, TaskContext
from worker.reaper import reap
from worker.redact import MASK
from worker.runtime import Runtime
from worker.sandbox.base import Sandbox, SandboxSpec
from worker.sandbox.sim import SimProvider

MODEL_KEY = "sk-ant-api03-attempt-log-secret"
FAST = {"SIM_LATENCY_S": "0.02"}


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"sandbox": "sim", "backoff_scale": 0, "sim_create_latency_s": 0,
                              "sim_latency_s": 0.02, "stall_timeout_s": 2,
                              "anthropic_api_key": MODEL_KEY}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def _run(provider: SimProvider, **fields: Any) -> tuple[AgentResult, list[dict[str, Any]]]:
    """One pipeline run; returns the result and every attempt record as it was persisted."""
    settings = provider.settings
    pipeline = Pipeline(settings, provider, ClaudeCodeAgent(),
                        runner=AgentRunner(Watchdog(tick_s=0.02), stall_timeout_s=2))
    task = AgentTask(prompt="hello", **fields)
    now = time.time()
    writes: list[dict[str, Any]] = []
    ctx = TaskContext(task_id="t", message=TaskMessage(task=task, submitted_at=now),
                      started_at=now, deadline_at=now + (task.timeout_s or 60), worker="w1",
                      delivery=1,
                      on_attempt=lambda e: writes.append(e.model_dump()))
    return pipeline.run(ctx), writes


def test_retried_attempts_say_why_and_that_their_sandbox_was_killed() -> None:
    """Given an agent overloaded on its first attempt, the log shows attempt 1 failed as
    model_unavailable and was retried, its sandbox confirmed killed, then attempt 2."""
    result, _ = _run(SimProvider(_settings()), envs={**FAST, "SIM_FAIL": "agent:overloaded:1"})
    assert result.ok, result.error
    assert result.attempts == 2
    first, second = result.attempt_log
    assert (first.attempt, first.outcome, first.retried) == (1, "model_unavailable", True)
    assert first.error is not None and "529" in first.error
    assert first.sandbox_id and first.sandbox_id != second.sandbox_id
    assert (first.sandbox_killed, first.killed_by) == (True, "worker")
    assert (second.outcome, second.retried, second.error) == ("succeeded", False, None)
    assert second.sandbox_id == result.sandbox_id and second.sandbox_killed is True
    assert {e.worker for e in result.attempt_log} == {"w1"}
    assert all(e.started_at and e.ended_at and e.ended_at >= e.started_at
               for e in result.attempt_log)


def test_an_attempt_without_a_sandbox_has_no_kill_to_report() -> None:
    result, _ = _run(SimProvider(_settings()), envs={**FAST, "SIM_FAIL": "create:rate_limit:1"})
    assert result.ok
    first = result.attempt_log[0]
    assert (first.outcome, first.sandbox_id, first.sandbox_killed) == ("rate_limited", None,
                                                                        None)


def test_a_permanent_failure_is_not_marked_retried() -> None:
    result, _ = _run(SimProvider(_settings()), envs={**FAST, "SIM_FAIL": "agent:auth"})
    assert [(e.outcome, e.retried) for e in result.attempt_log] == [("auth", False)]


def test_an_unconfirmed_kill_is_reported_as_such() -> None:
    """A sandbox whose kill failed is not reported killed (E2B reaps it at its timeout)."""
    class StubbornProvider(SimProvider):
        def create(self, spec: SandboxSpec) -> Sandbox:
            sandbox = super().create(spec)
            real_kill = sandbox.kill

            def kill() -> None:  # the kill "fails": logged, never raised, killed stays False
                real_kill()
                sandbox.killed = False

            sandbox.kill = kill  # type: ignore[method-assign]
            return sandbox

    result, _ = _run(StubbornProvider(_settings()), envs=FAST)
    assert result.attempt_log[0].sandbox_killed is False
    assert result.attempt_log[0].killed_by is None


def test_attempt_errors_are_redacted_in_the_result_and_in_what_is_persisted() -> None:
    class LeakyProvider(SimProvider):
        def create(self, spec: SandboxSpec) -> Sandbox:
            raise errors.SandboxUnavailable(f"E2B echoed key={spec.envs['ANTHROPIC_API_KEY']}")

    result, writes = _run(LeakyProvider(_settings()), envs=FAST, timeout_s=0.5)
    outcomes = [e.outcome for e in result.attempt_log]
    assert len(outcomes) >= 2 and set(outcomes) == {"sandbox_unavailable"}
    assert MODEL_KEY not in result.model_dump_json()
    assert MASK in (result.attempt_log[0].error or "")
    assert writes and MODEL_KEY not in json.dumps(writes)


def test_each_attempt_is_persisted_when_it_starts_and_when_it_ends() -> None:
    """A record exists from the start of the attempt: if the worker dies, the next delivery
    still sees it (as `running`)."""
    _, writes = _run(SimProvider(_settings()), envs=FAST)
    assert writes[0]["outcome"] == "running" and writes[0]["sandbox_id"] is None
    assert writes[-1]["outcome"] == "succeeded" and writes[-1]["sandbox_killed"] is True


# -- across deliveries (runtime + store) ------------------------------------------------------

def _runtime() -> Runtime:
    rt = Runtime(_settings(), worker_name="w2")
    rt.__dict__["redis"] = fakeredis.FakeRedis()
    rt.start_maintenance = lambda: None  # type: ignore[method-assign]
    return rt


def _message(**fields: Any) -> dict[str, Any]:
    return TaskMessage(task=AgentTask(prompt="hello", **fields)).model_dump(mode="json")


def _died_during_attempt(rt: Runtime, task_id: str, sandbox_id: str | None = "sim-dead") -> None:
    """A first delivery that recorded its attempt and then was kill -9ed."""
    rt.store.begin(task_id, 600, "w1", lease_ttl_s=-1)  # its lease has expired
    entry = AttemptRecord(attempt=1, delivery=1, worker="w1", sandbox_id=sandbox_id,
                          started_at=time.time())
    rt.store.update(task_id, **rt.store.attempt_values(entry))


def test_a_rerun_after_a_dead_worker_shows_the_lost_attempt() -> None:
    rt = _runtime()
    _died_during_attempt(rt, "t1")
    result = AgentResult.model_validate(rt.handle("t1", (_message(envs=FAST),), {}))
    assert result.ok
    lost, rerun = result.attempt_log
    assert (lost.attempt, lost.delivery, lost.worker) == (1, 1, "w1")
    assert (lost.outcome, lost.retried, lost.sandbox_killed) == ("worker_lost", True, None)
    assert lost.error is not None and "lease" in lost.error
    assert (rerun.attempt, rerun.delivery, rerun.worker, rerun.outcome) == (2, 2, "w2",
                                                                            "succeeded")
    # The record tells the same story to `sandqueue status` and to later deliveries.
    stored = TaskStore.attempt_log(rt.store.get("t1"))
    assert [(e.outcome, e.retried) for e in stored] == [("worker_lost", True),
                                                        ("succeeded", False)]


def test_a_lost_attempt_whose_sandbox_the_reaper_killed_says_so() -> None:
    rt = _runtime()
    provider = rt.pipeline.provider
    assert isinstance(provider, SimProvider)
    spec = SandboxSpec(task_id="t2", attempt=1, lifetime_s=900, deadline_at=time.time() + 600)
    orphan = provider.create(spec)
    provider._live.clear()  # it belonged to the dead worker, not this process
    rt.writer.sync()  # the sim registry records sandboxes through the write-behind
    _died_during_attempt(rt, "t2", orphan.sandbox_id)
    verdicts = reap(provider, rt.store, rt.settings.model_copy(update={"lease_ttl_s": 0.0}))
    assert [v.killed for v in verdicts] == [True]
    result = AgentResult.model_validate(rt.handle("t2", (_message(envs=FAST),), {}))
    lost = result.attempt_log[0]
    assert (lost.outcome, lost.sandbox_killed, lost.killed_by) == ("worker_lost", True,
                                                                   "reaper")


def test_the_reaper_never_creates_a_record_for_an_unknown_task() -> None:
    rt = _runtime()
    rt.store.note_reaped("gone", 1, "sim-x")
    assert rt.redis.exists(keys.task("gone")) == 0


def test_a_lost_attempt_not_rerun_because_of_side_effects_is_not_marked_retried() -> None:
    rt = _runtime()
    _died_during_attempt(rt, "t3")
    rt.store.record_tool_call("t3", "Bash")
    result = AgentResult.model_validate(rt.handle("t3", (_message(envs=FAST),), {}))
    assert result.error is not None and result.error.category.value == "worker_lost"
    assert [(e.attempt, e.outcome, e.retried) for e in result.attempt_log] == [
        (1, "worker_lost", False)]


def test_an_attempt_the_dead_worker_never_recorded_is_still_accounted_for() -> None:
    """Killed before its first write reached Redis: the attempt number was counted, so the
    rerun's log shows it lost rather than skipping from nothing to attempt 2."""
    rt = _runtime()
    rt.store.begin("t4", 600, "w1", lease_ttl_s=-1)
    result = AgentResult.model_validate(rt.handle("t4", (_message(envs=FAST),), {}))
    assert [(e.attempt, e.outcome) for e in result.attempt_log] == [(1, "worker_lost"),
                                                                    (2, "succeeded")]


@pytest.mark.parametrize("lease_lost", [False, True])
def test_a_stopped_attempt_is_handed_back_or_lost(lease_lost: bool) -> None:
    """SIGTERM after the grace period: `handed_back`; another worker took the lease over:
    `worker_lost`. Either way its sandbox was killed and the task runs again elsewhere."""
    import threading

    from worker.runtime import Duplicate, HandBack

    rt = _runtime()
    outcome: dict[str, Any] = {}

    def deliver() -> None:
        try:
            rt.handle("t5", (_message(envs={"SIM_LATENCY_S": "5"}),), {})
        except (Duplicate, HandBack) as e:
            outcome["raised"] = type(e).__name__

    thread = threading.Thread(target=deliver)
    thread.start()
    deadline = time.time() + 5
    while not rt.store.get("t5").get("sandbox_id") and time.time() < deadline:
        time.sleep(0.01)
    ctx = rt.active_contexts()["t5"]
    if lease_lost:
        ctx.lease_lost.set()
    ctx.stop.set()
    thread.join(5)
    assert outcome == {"raised": "Duplicate" if lease_lost else "HandBack"}
    (entry,) = TaskStore.attempt_log(rt.store.get("t5"))
    assert entry.outcome == ("worker_lost" if lease_lost else "handed_back")
    assert (entry.retried, entry.sandbox_killed, entry.killed_by) == (True, True, "worker")
