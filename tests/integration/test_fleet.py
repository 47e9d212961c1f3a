"""The fleet snapshot against a real worker process, real Celery messages and real leases."""

from __future__ import annotations

import time

import redis

from producer.api import Client
from sandqueue.fleet import fleet_snapshot
from tests.integration.conftest import StartWorker, wait_until


def test_a_busy_worker_its_backlog_and_its_tenant(rdb: redis.Redis, api_client: Client,
                                                  worker_factory: StartWorker) -> None:
    """One worker with one slot, three long tasks of tenant acme: one runs, the others wait
    in the queue (one of them may sit in the worker's prefetch, unacknowledged)."""
    worker = worker_factory(concurrency=1)
    before = time.time()
    handles = [api_client.submit(f"long {i}", envs={"SIM_LATENCY_S": "60"},
                                 labels={"tenant": "acme"}) for i in range(3)]

    def busy() -> object:
        snap = fleet_snapshot(rdb)
        live = [w for w in snap.workers if w.name.startswith(worker.name)]
        return snap if (live and live[0].in_flight == 1 and live[0].concurrency == 1
                        and snap.sandboxes.live == 1) else None

    snap = wait_until(busy, 30, "the worker's heartbeat, its one lease and its sandbox")
    (w,) = snap.workers
    assert w.queues == ["sandqueue"] and w.pid is not None
    assert snap.running == 1
    queue = next(q for q in snap.queues if q.name == "sandqueue")
    assert 1 <= queue.depth <= 2, "one runs, and at most one more is prefetched"
    assert queue.oldest_age_s is not None and 0 <= queue.oldest_age_s <= time.time() - before
    (tenant,) = snap.tenants
    assert (tenant.tenant, tenant.running, tenant.queued, tenant.submitted) == ("acme", 1, 2, 3)
    assert snap.sandboxes.counted_by == "sim"
    assert snap.creations.per_s > 0
    for handle in handles:
        handle.cancel()
    for handle in handles:
        assert handle.wait(timeout=30).status.value == "cancelled"
    idle = wait_until(lambda: (s := fleet_snapshot(rdb)).running == 0 and s, 30, "idle")
    assert [(t.tenant, t.running, t.queued) for t in idle.tenants] == [("acme", 0, 0)], \
        "listed while nothing of it runs (the producers' submit counter names it)"
