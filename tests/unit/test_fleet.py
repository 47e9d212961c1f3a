"""The fleet snapshot (sandqueue/fleet.py) reads what workers and producers keep in Redis.

Each test writes the keys as their writers do (the worker's heartbeat through the real
`Maintenance.advertise`, counters through the real `Observer`) and checks the snapshot.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import fakeredis
import pytest

from sandqueue import fleet, keys
from sandqueue.settings import Settings
from worker.limits import Limiter
from worker.maintenance import Maintenance
from worker.observe import Observer
from worker.pipeline import TaskContext
from worker.writebehind import WriteBehind

NOW = 1_800_000_000.0


def _settings(**fields: Any) -> Settings:
    return Settings(_env_file=None, sandbox="sim", **fields)  # type: ignore[call-arg]


def _kombu_message(task_id: str, submitted_at: float) -> str:
    """A message as kombu's Redis transport stores it (Celery protocol 2, base64 body)."""
    body = [[{"v": 1, "task": {"prompt": "x"}, "submitted_at": submitted_at}], {}, {}]
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"id": task_id, "task": "sandqueue.run_agent_task"},
        "properties": {"body_encoding": "base64", "delivery_tag": task_id, "priority": 0},
    })


def _advertise(r: fakeredis.FakeRedis, name: str, active: dict[str, Any],
               **settings: Any) -> None:
    s = _settings(**settings)
    Maintenance(s, r, None, Limiter(r, s), worker_name=name,  # type: ignore[arg-type]
                queues=["sandqueue", "heavy"], active=lambda: active, recover=None,
                provider=lambda: None).advertise()  # type: ignore[arg-type,return-value]


def test_an_empty_redis_is_an_idle_fleet() -> None:
    snap = fleet.fleet_snapshot(fakeredis.FakeRedis())
    assert snap.workers == [] and snap.tenants == [] and snap.running == 0
    assert [(q.name, q.depth, q.oldest_age_s) for q in snap.queues] == [("sandqueue", 0, None)]
    assert snap.sandboxes.live == 0 and snap.sandboxes.cap is None
    assert snap.creations.per_s == 0 and snap.creations.cooldown_s == 0


def test_workers_with_their_leases_and_heartbeat() -> None:
    r = fakeredis.FakeRedis()
    now = time.time()
    _advertise(r, "w1", {"a": object(), "b": object()}, concurrency=7, max_live_sandboxes=30)
    r.hset(keys.WORKER_LIMITS, "gone", json.dumps({"queues": ["x"], "until": now - 1}))
    r.zadd(keys.RUNNING, {"a": now + 10, "b": now + 10, "dead": now - 5, "c": now + 10})
    r.hset(keys.RUNNING_OWNERS, mapping={"a": "w1", "b": "w1", "dead": "w1", "c": "w2"})
    snap = fleet.fleet_snapshot(r, now=now)
    by_name = {w.name: w for w in snap.workers}
    assert set(by_name) == {"w1", "w2"}, "a worker gone quiet is not live; one with a lease is"
    w1 = by_name["w1"]
    assert (w1.in_flight, w1.heartbeat_in_flight, w1.concurrency) == (2, 2, 7)
    assert w1.queues == ["heavy", "sandqueue"] and w1.heartbeat_age_s is not None
    assert by_name["w2"].in_flight == 1 and by_name["w2"].concurrency is None
    assert snap.running == 3, "an expired lease is not a running task"
    assert [q.name for q in snap.queues] == ["heavy", "sandqueue"]
    assert snap.sandboxes.cap == 30


def test_queue_depth_counts_every_priority_list_and_ages_the_oldest_message() -> None:
    r = fakeredis.FakeRedis()
    for i in range(3):  # LPUSH as kombu publishes: the oldest ends up last
        r.lpush("sandqueue", _kombu_message(f"t{i}", NOW - 100 + i))
    r.lpush("sandqueue\x06\x163", _kombu_message("p", NOW - 500))
    r.lpush("other", json.dumps({"headers": {"id": "t-rec"}, "body": "???"}))  # the oldest
    r.lpush("other", "not json")
    r.hset(keys.task("t-rec"), "submitted_at", NOW - 40)
    snap = fleet.fleet_snapshot(r, queues=["other"], now=NOW)
    queues = {q.name: q for q in snap.queues}
    assert queues["sandqueue"].depth == 4
    assert queues["sandqueue"].oldest_age_s == pytest.approx(500)
    # an unreadable body: the age comes from the task record its header names
    assert (queues["other"].depth, queues["other"].oldest_age_s) == (2, pytest.approx(40))


def test_live_sandboxes_against_the_cap_and_the_simulators_count_without_one() -> None:
    r = fakeredis.FakeRedis()
    now = time.time()
    r.zadd(keys.LIMIT_SANDBOXES, {"t1:1": now + 10, "t2:1": now + 10, "old:1": now - 1})
    _advertise(r, "w1", {}, max_live_sandboxes=5)
    assert fleet.fleet_snapshot(r, now=now).sandboxes.model_dump() == {
        "live": 2, "cap": 5, "counted_by": "slots"}
    r2 = fakeredis.FakeRedis()
    r2.sadd(keys.SIM_LIVE, "s1", "s2", "s3")
    _advertise(r2, "w1", {})
    assert fleet.fleet_snapshot(r2, now=now).sandboxes.model_dump() == {
        "live": 3, "cap": None, "counted_by": "sim"}


def test_creation_rate_429s_and_cooldown_from_what_workers_count() -> None:
    r = fakeredis.FakeRedis()
    writer = WriteBehind(r)
    observer = Observer(writer)
    ctx = TaskContext(task_id="t", message=None, started_at=0, deadline_at=0)  # type: ignore[arg-type]
    observer.watch(ctx)
    for _ in range(12):
        ctx.on_event({"phase": "sandbox_created", "attempt": 1, "sandbox_id": "s"})
    ctx.on_event({"phase": "gateway_ready"})
    from sandqueue.contract import AttemptRecord

    ctx.on_attempt(AttemptRecord(attempt=1, outcome="rate_limited", ended_at=1.0))
    ctx.on_attempt(AttemptRecord(attempt=2, outcome="rate_limited"))  # not ended: not counted
    assert writer.sync()
    _advertise(r, "w1", {}, max_creates_per_s=2.5)
    Limiter(r, _settings()).slow_down(7)
    snap = fleet.fleet_snapshot(r)
    elapsed = (fleet.RATE_WINDOWS - 1) * keys.STATS_WINDOW_S
    assert 12 / (elapsed + keys.STATS_WINDOW_S) <= snap.creations.per_s <= 12 / elapsed
    assert snap.creations.limit_per_s == 2.5
    assert snap.creations.rate_limited_last_min == 1
    assert 5 < snap.creations.cooldown_s <= 7 and snap.creations.slowed


def test_old_counter_windows_do_not_count() -> None:
    r = fakeredis.FakeRedis()
    window = int(NOW // keys.STATS_WINDOW_S)
    r.set(keys.stats("creates", window - fleet.RATE_WINDOWS), 100)  # just over a minute ago
    r.set(keys.stats("creates", window), 6)
    snap = fleet.fleet_snapshot(r, now=NOW)
    assert snap.creations.per_s == pytest.approx(6 / ((fleet.RATE_WINDOWS - 1) * 10), rel=0.01)


def test_tenants_running_and_queued() -> None:
    r = fakeredis.FakeRedis()
    now = time.time()
    for task_id, tenant in [("a1", "acme"), ("a2", "acme"), ("b1", "beta")]:
        r.zadd(keys.RUNNING, {task_id: now + 10})
        r.hset(keys.task(task_id), "tenant", tenant)
    r.zadd(keys.RUNNING, {"anon": now + 10})  # a task without a tenant
    r.zadd(keys.tenant_open("acme"), {"a1": 1, "a2": 1, "a3": 1, "a4": 1, "a5": 1})
    r.zadd(keys.tenant_open("beta"), {"b1": 1})
    r.sadd(keys.APIKEYS, "k1", "k2")
    r.hset(keys.apikey("k1"), "tenant", "idle")
    r.hset(keys.apikey("k2"), "tenant", "acme")
    r.hset(keys.STATS_SUBMITTED, mapping={"acme": 9, "cli-only": 4})
    r.zadd(keys.tenant_open("cli-only"), {"c1": 1, "c2": 1})
    snap = fleet.fleet_snapshot(r, now=now)
    assert [(t.tenant, t.running, t.queued, t.submitted) for t in snap.tenants] == [
        ("acme", 2, 3, 9), ("beta", 1, 0, 0), ("cli-only", 0, 2, 4), ("idle", 0, 0, 0)]
    assert snap.running == 4 and not snap.partial


def test_the_snapshot_costs_a_few_round_trips_whatever_the_fleet_size() -> None:
    """Pipelined: the number of requests does not grow with workers, tasks or tenants."""
    r = fakeredis.FakeRedis()
    now = time.time()
    for i in range(300):
        r.zadd(keys.RUNNING, {f"t{i}": now + 10})
        r.hset(keys.RUNNING_OWNERS, f"t{i}", f"w{i % 7}")
        r.hset(keys.task(f"t{i}"), "tenant", f"ten{i % 11}")
        r.zadd(keys.tenant_open(f"ten{i % 11}"), {f"t{i}": 1})
    calls: list[str] = []
    original = r.execute_command
    r.execute_command = lambda *a, **k: calls.append(a[0]) or original(*a, **k)  # type: ignore[method-assign]
    pipes: list[int] = []
    original_pipeline = r.pipeline

    def pipeline(*a: Any, **k: Any) -> Any:
        pipes.append(1)
        return original_pipeline(*a, **k)

    r.pipeline = pipeline  # type: ignore[method-assign]
    snap = fleet.fleet_snapshot(r, now=now)
    assert snap.running == 300 and len(snap.tenants) == 11
    assert len(pipes) + len(calls) <= 3, (pipes, calls)
    assert "KEYS" not in calls and "SCAN" not in calls


def test_the_workers_counters_expire() -> None:
    r = fakeredis.FakeRedis()
    writer = WriteBehind(r)
    observer = Observer(writer)
    for _ in range(3):
        observer.count("creates")
    assert writer.sync()
    (key,) = r.keys("sq:stats:creates:*")
    assert int(r.get(key)) == 3
    assert 0 < r.ttl(key) <= 600, "a counter window must not outlive its use"


def test_beyond_the_lookup_bound_the_count_stays_exact_and_says_partial(
        monkeypatch: pytest.MonkeyPatch) -> None:
    r = fakeredis.FakeRedis()
    now = time.time()
    for i in range(5):
        r.zadd(keys.RUNNING, {f"t{i}": now + 10})
        r.hset(keys.task(f"t{i}"), "tenant", "acme")
    monkeypatch.setattr(fleet, "MAX_RUNNING", 3)
    snap = fleet.fleet_snapshot(r, now=now)
    assert snap.running == 5 and snap.partial
    assert [(t.tenant, t.running) for t in snap.tenants] == [("acme", 3)]
