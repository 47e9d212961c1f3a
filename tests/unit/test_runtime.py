"""One delivery as the worker handles it, in-process on fakeredis (no Celery eager mode:
`Runtime.handle` is exactly what the Celery task calls)."""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from sandqueue import keys
from sandqueue.contract import AgentResult, AgentTask, TaskMessage, TaskStatus
from sandqueue.settings import Settings
from worker.runtime import Duplicate, Runtime


def _runtime() -> Runtime:
    settings = Settings(_env_file=None, sandbox="sim", backoff_scale=0,  # type: ignore[arg-type]
                        sim_create_latency_s=0, sim_latency_s=0.02, stall_timeout_s=2)
    rt = Runtime(settings, worker_name="test-worker")
    rt.__dict__["redis"] = fakeredis.FakeRedis()
    rt.start_maintenance = lambda: None  # type: ignore[method-assign]
    return rt


def _message(**fields: Any) -> dict[str, Any]:
    return TaskMessage(task=AgentTask(prompt="hello", **fields)).model_dump(mode="json")


def _sandboxes_created(rt: Runtime) -> int:
    """Counted in Redis by the sim provider, as across processes."""
    return int(rt.redis.get(keys.SIM_CREATED) or 0)


RT = _runtime()

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(junk, max_size=3), kwargs=st.dictionaries(st.text(max_size=5), junk,
                                                               max_size=2))
def test_any_raw_message_ends_as_invalid_task_without_a_sandbox(args: list[Any],
                                                                 kwargs: dict[str, Any]) -> None:
    """Whatever arrives from the broker, the worker answers with data and creates nothing."""
    before = _sandboxes_created(RT)
    try:
        outcome = RT.handle("t-junk", tuple(args), kwargs)
    except Duplicate:
        return  # only for a task id already finished: not this case
    result = AgentResult.model_validate(outcome)
    if result.status is TaskStatus.FAILED and result.error is not None:
        assert result.error.category.value in {"invalid_task", "mcp_config"}
        assert _sandboxes_created(RT) == before


@pytest.mark.parametrize("payload", [
    {"v": 1, "task": {"prompt": "x" * 300_000}},
    {"v": 1, "task": {"prompt": "hi", "mcp": {"githubb": {}}}},
    {"v": 1, "task": {"prompt": "hi", "unknown_field": 1}},
    {"v": 2, "task": {"prompt": "hi"}},
    {"v": 1, "task": {"prompt": 42}},
])
def test_invalid_messages_fail_as_invalid_task(payload: dict[str, Any]) -> None:
    rt = _runtime()
    result = AgentResult.model_validate(rt.handle("t1", (payload,), {}))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "invalid_task"
    assert _sandboxes_created(rt) == 0
    assert rt.store.get("t1")["status"] == "failed"


def test_a_valid_message_runs_and_records_its_state() -> None:
    rt = _runtime()
    result = AgentResult.model_validate(rt.handle("t2", (_message(),), {}))
    assert result.status is TaskStatus.SUCCEEDED and result.simulated
    record = rt.store.get("t2")
    assert record["status"] == "succeeded" and record["attempt"] == "1"
    assert rt.redis.zscore(keys.RUNNING, "t2") is None, "the lease must be released"


def test_a_duplicate_delivery_of_a_finished_task_is_ignored() -> None:
    rt = _runtime()
    rt.handle("t3", (_message(),), {})
    with pytest.raises(Duplicate):
        rt.handle("t3", (_message(),), {})
    assert _sandboxes_created(rt) == 1


def test_a_delivery_while_another_worker_holds_the_lease_is_ignored() -> None:
    rt = _runtime()
    rt.store.begin("t4", 600, "other-worker", lease_ttl_s=30)  # a live worker has it
    with pytest.raises(Duplicate):
        rt.handle("t4", (_message(),), {})
    assert _sandboxes_created(rt) == 0


def test_redelivery_after_tool_calls_ends_worker_lost_with_partial_progress() -> None:
    """Given a first delivery that made a tool call and died, the next one does not re-run it."""
    rt = _runtime()
    rt.store.begin("t5", 600, "dead-worker", lease_ttl_s=-1)  # it died: its lease expired
    rt.store.record_tool_call("t5", "mcp__e2b-mcp-gateway__github_create_issue")
    rt.store.update("t5", last_text="opened issue #12")
    result = AgentResult.model_validate(rt.handle("t5", (_message(),), {}))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "worker_lost"
    assert result.tool_calls[0].name.endswith("create_issue")
    assert result.result == "opened issue #12"
    assert result.attempts == 1, "the first delivery's attempt, not a phantom one"
    assert _sandboxes_created(rt) == 0


def test_redelivery_after_tool_calls_runs_again_when_the_task_opts_in() -> None:
    rt = _runtime()
    rt.store.begin("t6", 600, "dead-worker", lease_ttl_s=-1)
    rt.store.record_tool_call("t6", "Bash")
    message = _message(retry={"retry_after_side_effects": True})
    result = AgentResult.model_validate(rt.handle("t6", (message,), {}))
    assert result.status is TaskStatus.SUCCEEDED


def test_a_task_cancelled_while_queued_never_starts() -> None:
    rt = _runtime()
    rt.redis.hset(keys.task("t7"), "cancel", 1)
    result = AgentResult.model_validate(rt.handle("t7", (_message(),), {}))
    assert result.status is TaskStatus.CANCELLED
    assert _sandboxes_created(rt) == 0


def test_events_are_published_in_order_and_end_with_the_result() -> None:
    rt = _runtime()
    rt.handle("t8", (_message(envs={"SIM_TOOL_CALLS": "2"}),), {})
    entries = rt.redis.xrange(keys.events("t8"))
    phases = [json.loads(fields[b"data"])["phase"] for _, fields in entries]
    assert phases[0] == "started" and phases[-1] == "result"
    assert phases.index("sandbox_created") < phases.index("agent_started")
    assert phases.count("tool_call") == 2
    stamps = [float(fields[b"ts"]) for _, fields in entries]
    assert stamps == sorted(stamps)
    assert rt.redis.ttl(keys.events("t8")) > 0, "events must expire"


def test_max_cost_usd_stops_the_agent() -> None:
    """Given a per-task cap below what the agent spends, it is stopped, not left running."""
    rt = _runtime()
    message = _message(max_cost_usd=0.001, envs={"SIM_TOOL_CALLS": "6", "SIM_LATENCY_S": "0.3"})
    result = AgentResult.model_validate(rt.handle("t9", (message,), {}))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "budget_exceeded"
    assert 0 < result.tool_call_total < 6  # stopped early: no wall-clock bound needed
    assert result.total_cost_usd is not None and result.total_cost_usd >= 0.001
    assert rt.pipeline.provider.list_live() == []


def test_a_run_whose_lease_was_taken_over_stops_without_touching_the_new_owner() -> None:
    """Given a worker cut off from Redis long enough for another to take its task over,
    when it notices (lease renewal), its run stops and the new owner's lease is left alone."""
    import threading


    rt = _runtime()
    outcome: dict[str, Any] = {}

    def deliver() -> None:
        try:
            outcome["value"] = rt.handle("t10", (_message(envs={"SIM_LATENCY_S": "5"}),), {})
        except Duplicate:
            outcome["ignored"] = True

    thread = threading.Thread(target=deliver)
    thread.start()
    deadline = time.time() + 5
    while "t10" not in rt.active_contexts() and time.time() < deadline:
        time.sleep(0.01)
    rt.redis.hset(keys.RUNNING_OWNERS, "t10", "other-worker")  # recovered elsewhere
    rt.new_maintenance().renew_leases()
    thread.join(5)
    assert outcome == {"ignored": True}
    assert rt.redis.hget(keys.RUNNING_OWNERS, "t10") == b"other-worker"
    assert rt.pipeline.provider.list_live() == []


def test_a_task_cancelled_while_queued_is_answered_once_by_the_worker_that_receives_it() -> None:
    # Given a task a producer cancelled while queued, and died before storing its result
    rt = _runtime()
    rt.result_exists = lambda task_id: bool(rt.redis.exists(f"celery-task-meta-{task_id}"))
    rt.redis.hset(keys.task("t-c"), mapping={"status": "cancelled", "cancel": 1})

    # When its message arrives, a result is stored (returned) and no sandbox is created
    result = AgentResult.model_validate(rt.handle("t-c", (_message(),), {}))
    assert result.status is TaskStatus.CANCELLED
    assert _sandboxes_created(rt) == 0

    # And once its result exists, a further copy is only acknowledged
    rt.redis.set("celery-task-meta-t-c", "{}")
    with pytest.raises(Duplicate):
        rt.handle("t-c", (_message(),), {})


def test_a_second_copy_of_a_running_task_in_the_same_worker_is_dropped() -> None:
    # Given a worker running a task (its lease owner is this worker)
    import threading

    rt = _runtime()
    message = _message(envs={"SIM_LATENCY_S": "0.5"})
    outcome: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcome.update(rt.handle("t-dup", (message,), {})))
    first.start()
    deadline = time.monotonic() + 10
    while not rt.active_contexts() and time.monotonic() < deadline:
        time.sleep(0.01)

    # When a second copy of its message arrives at the same worker, it is only acknowledged
    with pytest.raises(Duplicate):
        rt.handle("t-dup", (message,), {})
    first.join(10)

    # And the task ran once, in one sandbox
    assert AgentResult.model_validate(outcome).status is TaskStatus.SUCCEEDED
    assert _sandboxes_created(rt) == 1


def test_a_task_cancelled_while_stepping_aside_stays_cancelled() -> None:
    # A producer cancels a queued task just as a worker sends it back over a per-key limit:
    # the worker's late "queued" must not hide "cancelled" (or the next delivery runs it).
    rt = _runtime()
    rt.redis.hset(keys.task("t-s"), mapping={"status": "cancelled", "cancel": 1})
    assert rt.store.requeued("t-s", "throttled_at") is False
    assert rt.redis.hget(keys.task("t-s"), "status") == b"cancelled"
    rt.redis.hset(keys.task("t-q"), mapping={"status": "queued"})
    assert rt.store.requeued("t-q", "throttled_at") is True
    assert rt.redis.hget(keys.task("t-q"), "throttled_at") is not None
