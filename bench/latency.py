"""4. Latency: submit-to-start p50/p99 at half of capacity, sandqueue and bare Celery side by side.

Open loop: tasks are submitted on a fixed schedule (not one after another's completion),
so a slow worker shows up as latency instead of slowing the offered load. Latency is from
just before the producer call (`Client.submit` / `send_task`) to the moment the worker began
the task: sandqueue's `started_at` in its task record, the bare task's returned start time.

Two loads, each at half of capacity, on a threads worker of the same concurrency:

* zero-time tasks: capacity is sandqueue's measured drain rate (a staged burst, as in the
  overhead section); both systems get half of it, so they face the same offered rate.
* sandboxes of `task_s` (2 s): capacity is concurrency / task_s slots per second; half of
  it keeps half the slots busy. Bare Celery runs `time.sleep(task_s)`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import harness
from bench.bare_app import NOOP, SLEEP
from bench.harness import Bench, BenchError, Kind, Worker, WorkerSpec, agent_task, wire_message


def _probe_capacity(b: Bench, w: Worker, n: int) -> float:
    staging = f"{w.spec.queue}.staging"
    ids = b.publish(w.spec.kind, [agent_task(i, tag="probe") for i in range(n)], staging,
                    w.spec.queue)
    b.redis.release(staging, w.spec.queue)
    b.redis.wait_done(ids, timeout_s=60 + n / 10)
    return harness.window_rate(b.redis.done_times(ids))


def _open_loop(b: Bench, kind: Kind, submit: Callable[[int], str], rate: float,
               duration_s: float, task_s: float) -> dict[str, Any]:
    n = max(20, int(rate * duration_s))
    sent: list[tuple[str, float]] = []
    t0 = time.time() + 0.2
    lag_max = 0.0
    for i in range(n):
        due = t0 + i / rate
        now = time.time()
        if due > now:
            time.sleep(due - now)
        else:
            lag_max = max(lag_max, now - due)
        at = time.time()
        sent.append((submit(i), at))
    ids = [i for i, _ in sent]
    b.redis.wait_done(ids, timeout_s=60 + task_s * 3 + duration_s)
    if kind == "sandqueue":
        starts = b.redis.started_times(ids)
    else:
        starts = {i: float(r["result"]) for i, r in zip(ids, b.redis.results(ids), strict=True)
                  if isinstance(r.get("result"), float)}
    if len(starts) != n:
        raise BenchError(f"{kind}: start times of only {len(starts)} of {n} tasks")
    lat = [1000 * (starts[i] - at) for i, at in sent]
    span = sent[-1][1] - sent[0][1]
    return {
        "tasks": n,
        "offered_per_s": round(rate, 1),
        "achieved_per_s": round((n - 1) / span, 1) if span > 0 else None,
        "submit_lag_max_ms": round(1000 * lag_max, 1),
        "p50_ms": round(harness.percentile(lat, 50), 2),
        "p90_ms": round(harness.percentile(lat, 90), 2),
        "p99_ms": round(harness.percentile(lat, 99), 2),
        "max_ms": round(max(lat), 2),
    }


def _submitter(b: Bench, w: Worker, task_s: float, create_s: float) -> Callable[[int], str]:
    queue = w.spec.queue
    if w.spec.kind == "sandqueue":
        client = b.sandqueue_client(queue)

        def submit_sq(i: int) -> str:
            task = agent_task(i, latency_s=max(0.0, task_s - create_s),
                              create_s=create_s if task_s else 0.0, tag="latency")
            return str(client.submit(task, queue=queue).id)

        return submit_sq
    app = b.control(queue)

    def submit_bare(i: int) -> str:
        task = agent_task(i, tag="latency")
        if task_s:
            return str(app.send_task(SLEEP, args=[task_s, wire_message(task)], queue=queue).id)
        return str(app.send_task(NOOP, args=[wire_message(task)], queue=queue).id)

    return submit_bare


def run(sizes: Any) -> dict[str, Any]:
    concurrency = sizes.latency_concurrency
    out: dict[str, Any] = {"concurrency": concurrency, "pool": "threads",
                           "task_s": sizes.latency_task_s, "scenarios": {}}
    with Bench() as b:
        workers: dict[str, WorkerSpec] = {
            kind: WorkerSpec(kind, "threads", concurrency,  # type: ignore[arg-type]
                             f"bench.latency.{kind}.{uuid.uuid4().hex[:6]}",
                             tag=f"latency{concurrency}")
            for kind in ("sandqueue", "bare")
        }
        zero: dict[str, Any] = {}
        slow: dict[str, Any] = {}
        capacity: dict[str, float] = {}
        for kind, spec in workers.items():
            with b.worker(spec, warmup=concurrency) as w:
                capacity[kind] = _probe_capacity(b, w, sizes.latency_probe_tasks)
                # Both systems get the same offered rate: half of sandqueue's capacity.
                rate = capacity["sandqueue"] / 2
                zero[kind] = {"worker": spec.describe(), "capacity_per_s": round(
                    capacity[kind], 1), **_open_loop(b, kind, _submitter(b, w, 0.0, 0.0), rate,
                                                     sizes.latency_duration_s, 0.0)}
                slow_rate = concurrency / sizes.latency_task_s / 2
                slow[kind] = {"worker": spec.describe(),
                              "capacity_per_s": round(concurrency / sizes.latency_task_s, 1),
                              **_open_loop(b, kind, _submitter(b, w, sizes.latency_task_s,
                                                               sizes.create_s),
                                           slow_rate, sizes.latency_duration_s,
                                           sizes.latency_task_s)}
        out["scenarios"]["zero_time"] = zero
        out["scenarios"][f"{sizes.latency_task_s:g}s_sandboxes"] = slow
    return out
