"""1. Overhead: sandqueue tasks that take zero time against bare Celery no-ops.

Both run as real worker processes with the same pool, concurrency and Celery configuration
through the same Redis, one after the other in the same run. The sim sandbox and agent take
zero time (SIM_LATENCY_S=0, SIM_CREATE_LATENCY_S=0), so what is left is sandqueue's own
per-task cost: message validation, its task record, the sim registry, the agent adapter
and stream parsing, and the result. Target: at least 0.7x bare Celery's throughput.

Also reported: Redis commands and bytes per task (producer and worker side separately,
from INFO before/after), worker and Redis CPU per task, a MONITOR trace of which commands
a task sends, and a py-spy profile of each worker.
"""

from __future__ import annotations

import json
import statistics
import uuid
from typing import Any

from bench import harness
from bench.harness import Bench, BenchError, Kind, Worker, WorkerSpec, agent_task
from bench.profiling import MonitorTrace, analyze_collapsed, pyspy

TARGET_RATIO = 0.7


def _round(b: Bench, w: Worker, n: int) -> dict[str, Any]:
    """Stage n zero-time tasks, release them to the warmed worker, time the drain."""
    kind: Kind = w.spec.kind
    staging = f"{w.spec.queue}.staging"
    tasks = [agent_task(i, tag="overhead") for i in range(n)]
    b.redis.reset_stats()
    s0 = b.redis.snapshot()
    ids = b.publish(kind, tasks, staging, w.spec.queue)
    s1 = b.redis.snapshot()
    cpu0 = w.cpu_s()
    released = b.redis.release(staging, w.spec.queue)
    b.redis.wait_done(ids, timeout_s=60 + n / 10)
    cpu1 = w.cpu_s()
    s2 = b.redis.snapshot()
    done = b.redis.done_times(ids)
    results = b.redis.results(ids)
    ok = sum(1 for r in results if r.get("status") == "SUCCESS"
             and (kind == "bare" or (r.get("result") or {}).get("status") == "succeeded"))
    if ok != n:
        raise BenchError(f"{kind}: only {ok} of {n} tasks succeeded")
    return {
        "tasks": n,
        "throughput_tps": round(harness.window_rate(done), 1),
        "drain_s": round(max(done) - released, 3),
        "worker_cpu_ms_per_task": round(1000 * (cpu1 - cpu0) / n, 3),
        "producer_redis": harness.BenchRedis.diff(s0, s1).per_task(n),
        "worker_redis": harness.BenchRedis.diff(s1, s2).per_task(n),
        "result_bytes": round(sum(len(json.dumps(r)) for r in results) / n),
    }


def _profile(b: Bench, w: Worker, n: int) -> dict[str, Any]:
    staging = f"{w.spec.queue}.staging"
    ids = b.publish(w.spec.kind, [agent_task(i, tag="profile") for i in range(n)], staging,
                    w.spec.queue)
    out = harness.OUT / f"profile-{w.spec.kind}-{w.spec.pool}.txt"
    with pyspy(w.pid, out, subprocesses=w.spec.pool == "prefork") as state:
        if state["error"] is None:
            b.redis.release(staging, w.spec.queue)
            b.redis.wait_done(ids, timeout_s=120 + n / 5)
    if state["error"] is not None:
        return {"error": state["error"]}
    return {"tasks": n, "collapsed_stacks": str(out.relative_to(harness.REPO)),
            **analyze_collapsed(out)}


def _trace(b: Bench, w: Worker, n: int) -> dict[str, Any]:
    staging = f"{w.spec.queue}.staging"
    ids = b.publish(w.spec.kind, [agent_task(i, tag="trace") for i in range(n)], staging,
                    w.spec.queue)
    with MonitorTrace(b.redis.url, b.redis.addr) as trace:
        b.redis.release(staging, w.spec.queue)
        b.redis.wait_done(ids, timeout_s=60)
    return {"tasks": n, "commands_per_task": round(trace.total / n, 2),
            "by_shape": trace.per_task(n)}


def _system(b: Bench, kind: Kind, pool: str, concurrency: int, sizes: Any,
            deep: bool) -> dict[str, Any]:
    spec = WorkerSpec(kind, pool, concurrency, f"bench.{kind}.{uuid.uuid4().hex[:6]}",
                      tag=f"overhead-{pool}{concurrency}")
    with b.worker(spec) as w:
        rounds = [_round(b, w, sizes.overhead_tasks) for _ in range(sizes.overhead_rounds)]
        entry: dict[str, Any] = {"worker": spec.describe(), "effective": w.effective(),
                                 "rounds": rounds}
        entry["throughput_tps"] = round(statistics.median(r["throughput_tps"] for r in rounds),
                                        1)
        if deep:
            entry["trace"] = _trace(b, w, sizes.trace_tasks)
            if sizes.profile:
                entry["profile"] = _profile(b, w, sizes.profile_tasks)
        entry["peak_rss_mb"] = harness.mb(w.peak_rss())
    return entry


def run(sizes: Any) -> dict[str, Any]:
    configs = []
    for pool, concurrency in sizes.overhead_pools:
        deep = pool == "threads"
        with Bench() as b:
            systems = {kind: _system(b, kind, pool, concurrency, sizes, deep)
                       for kind in ("bare", "sandqueue")}
        bare, sq = systems["bare"]["throughput_tps"], systems["sandqueue"]["throughput_tps"]
        ratio = round(sq / bare, 3) if bare else float("nan")
        configs.append({"pool": pool, "concurrency": concurrency, "systems": systems,
                        "ratio": ratio, "target": TARGET_RATIO, "met": ratio >= TARGET_RATIO})
    return {"configs": configs}
