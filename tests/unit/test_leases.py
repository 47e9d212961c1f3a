"""Lease renewal: a healthy worker keeps the leases of the tasks it runs, and only those.

If renewal stopped extending `sq:running`, every task longer than two leases on a healthy
worker would be recovered as an orphan, run again and end `worker_lost`. These tests run the
real Lua scripts on fakeredis; tests/integration/test_crash_safety.py runs a long task on
real workers.
"""

from __future__ import annotations

import time

import fakeredis

from sandqueue import keys
from sandqueue.contract import AgentTask, TaskMessage
from sandqueue.settings import Settings
from sandqueue.store import TaskStore
from worker.pipeline import TaskContext
from worker.runtime import Runtime

LEASE_S = 60.0


def _store() -> TaskStore:
    return TaskStore(fakeredis.FakeRedis(), ttl_s=3600)


def _expiry(store: TaskStore, task_id: str) -> float | None:
    return store.r.zscore(keys.RUNNING, task_id)


def _owner(store: TaskStore, task_id: str) -> bytes | None:
    return store.r.hget(keys.RUNNING_OWNERS, task_id)


def test_renewal_extends_exactly_this_workers_leases_and_reports_the_lost() -> None:
    store = _store()
    # Given w1 runs a and b, whose leases have just run out (a slow renewal, say)
    store.begin("a", 600, "w1", lease_ttl_s=-1)
    store.begin("b", 600, "w1", lease_ttl_s=-1)
    # and w2 runs c, also with a lapsed lease (w2 may be dead: recovery must be able to see it)
    store.begin("c", 600, "w2", lease_ttl_s=-1)
    c_expiry = _expiry(store, "c")
    # and w1 ran d and e, but recovery took them over: d now runs on w2, e waits in the queue
    for task_id in ("d", "e"):
        store.begin(task_id, 600, "w1", lease_ttl_s=-1)
        assert store.claim_expired(task_id)
    store.begin("d", 600, "w2", lease_ttl_s=30)
    d_expiry = _expiry(store, "d")

    # When w1 renews the leases of the tasks it believes it runs
    before = time.time()
    lost = store.renew_leases(["a", "b", "d", "e"], "w1", LEASE_S)
    after = time.time()

    # Then its own leases run a full lease from now, and nobody else's lease moved
    for task_id in ("a", "b"):
        expiry = _expiry(store, task_id)
        assert expiry is not None and before + LEASE_S <= expiry <= after + LEASE_S, task_id
        assert store.has_live_lease(task_id)
        assert _owner(store, task_id) == b"w1"
    assert _expiry(store, "c") == c_expiry and not store.has_live_lease("c")
    assert _expiry(store, "d") == d_expiry and _owner(store, "d") == b"w2"
    # A lease recovery removed is not brought back (the task is queued for someone else)
    assert _expiry(store, "e") is None and _owner(store, "e") is None
    # And the ones it no longer holds are reported, so its runs of them stop
    assert sorted(lost) == ["d", "e"]


def test_renewing_nothing_touches_nothing() -> None:
    store = _store()
    store.begin("a", 600, "w1", lease_ttl_s=-1)
    assert store.renew_leases([], "w1", LEASE_S) == []
    assert not store.has_live_lease("a")


def _runtime(lease_ttl_s: float = LEASE_S) -> Runtime:
    settings = Settings(_env_file=None, sandbox="sim", lease_ttl_s=lease_ttl_s,  # type: ignore[call-arg]
                        recover_interval_s=3600, reap_interval_s=3600)
    rt = Runtime(settings, worker_name="w1")
    rt.__dict__["redis"] = fakeredis.FakeRedis()
    return rt


def _running(rt: Runtime, task_id: str, worker: str) -> TaskContext:
    """A task this runtime believes it runs; its lease in Redis held by `worker`, lapsed."""
    rt.store.begin(task_id, 600, worker, lease_ttl_s=-1)
    message = TaskMessage(task=AgentTask(prompt="long"))
    ctx = TaskContext(task_id=task_id, message=message, started_at=time.time(),
                      deadline_at=time.time() + 600)
    rt._active[task_id] = ctx
    return ctx


def test_the_maintenance_duty_keeps_running_tasks_and_stops_the_taken_over() -> None:
    # Given a worker running two tasks, one of which another worker has taken over
    rt = _runtime()
    mine = _running(rt, "mine", "w1")
    taken = _running(rt, "taken", "w2")
    taken_expiry = _expiry(rt.store, "taken")

    # When its maintenance renews leases
    rt.new_maintenance().renew_leases()

    # Then its own task holds a live lease (recovery leaves it alone) and runs on
    assert rt.store.has_live_lease("mine")
    assert not mine.stop.is_set() and not mine.lease_lost.is_set()
    # and the other is stopped as lost, its new owner's lease untouched
    assert taken.stop.is_set() and taken.lease_lost.is_set()
    assert _expiry(rt.store, "taken") == taken_expiry
    assert _owner(rt.store, "taken") == b"w2"


def test_the_maintenance_thread_renews_before_the_lease_runs_out() -> None:
    # Given a running task whose lease (2 s) is about to run out
    rt = _runtime(lease_ttl_s=2)
    _running(rt, "long", "w1")
    first = _expiry(rt.store, "long")
    assert first is not None
    maintenance = rt.new_maintenance()
    # When the maintenance thread runs, Then it renews the lease, again and again
    maintenance.start()
    try:
        seen = [first]
        deadline = time.monotonic() + 30  # generous: the duty runs every ~2/3 s
        while len(seen) < 3 and time.monotonic() < deadline:
            expiry = _expiry(rt.store, "long")
            if expiry is not None and expiry > seen[-1]:
                seen.append(expiry)
            time.sleep(0.05)
    finally:
        maintenance.stop()
    assert len(seen) == 3, f"the lease was renewed {len(seen) - 1} time(s) in 30 s"
