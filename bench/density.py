"""2. Density: how many 2-second sandboxes one threads-pool worker process keeps in flight.

Each task's sim sandbox takes `create_s` to create and its agent the rest of `task_s`
(2 s in all), time spent waiting, as a real sandbox would. For each concurrency level a
fresh worker (`--pool threads --concurrency C`) is warmed up, then `waves x C` tasks are
released to it at once. Reported: completed tasks/s, makespan against the ideal
(tasks x task_s / C), the most tasks seen in flight at once (from each task's start and
end), and the worker's peak RSS. Target: at 200, makespan within 1.2x of ideal and RSS under
300 MB.

The naive deployment, a prefork worker of 4 processes, gets the same load as the
200-level run; it would take minutes to finish, so it is measured for a fixed window and
its makespan for the load is projected from the completions in that window.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

from bench import harness
from bench.harness import Bench, WorkerSpec, agent_task

TARGET_LEVEL = 200
TARGET_MAKESPAN_RATIO = 1.2
TARGET_RSS_MB = 300


def _tasks(n: int, sizes: Any) -> list[dict[str, Any]]:
    return [agent_task(i, latency_s=sizes.task_s - sizes.create_s, create_s=sizes.create_s,
                       tag="density") for i in range(n)]


def _failures(results: list[dict[str, Any]]) -> dict[str, int]:
    """Why tasks did not succeed, counted: a density limit shows up as errors, not only time."""
    out: Counter[str] = Counter()
    for meta in results:
        result = meta.get("result")
        if isinstance(result, dict) and result.get("status") == "succeeded":
            continue
        if isinstance(result, dict) and result.get("error"):
            err = result["error"]
            why = str(err.get("message", ""))[:120]
            out[f"{result.get('status')}: {err.get('category')}: {why}"] += 1
        elif meta.get("status") == "FAILURE":
            exc = result if isinstance(result, dict) else {}
            out[f"Celery FAILURE: {exc.get('exc_type', '?')}: "
                f"{str(exc.get('exc_message', ''))[:120]}"] += 1
        else:
            out[f"{meta.get('status', 'no result')}"] += 1
    return dict(out.most_common())


def _level(b: Bench, concurrency: int, sizes: Any) -> dict[str, Any]:
    queue = f"bench.density.{uuid.uuid4().hex[:6]}"
    spec = WorkerSpec("sandqueue", "threads", concurrency, queue, tag=f"density{concurrency}")
    n = concurrency * sizes.density_waves
    ideal = n * sizes.task_s / concurrency
    with b.worker(spec, warmup=min(concurrency, 50)) as w:
        rss_idle = w.rss()
        ids = b.publish("sandqueue", _tasks(n, sizes), f"{queue}.staging", queue)
        cpu0 = w.cpu_s()
        released = b.redis.release(f"{queue}.staging", queue)
        b.redis.wait_done(ids, timeout_s=3 * ideal + 60)
        cpu1 = w.cpu_s()
        peak_rss = w.peak_rss()
    results = b.redis.results(ids)
    failures = _failures(results)
    ok = n - sum(failures.values())
    done = b.redis.done_times(ids)
    started = b.redis.started_times(ids)
    ends = dict(zip(ids, done, strict=True))
    makespan = max(done) - released
    first_wave = sorted(started.values())[:concurrency]
    # How long each task took inside the worker, against the sandbox's task_s: the
    # worker's own per-task cost, stretched by GIL contention when many threads are busy.
    durations = [ends[i] - started[i] for i in ids if i in started]
    return {
        "concurrency": concurrency,
        "tasks": n,
        "succeeded": ok,
        "failures": failures,
        "worker": spec.describe(),
        "tasks_per_s": round(n / makespan, 1),
        "makespan_s": round(makespan, 2),
        "ideal_s": round(ideal, 2),
        "makespan_ratio": round(makespan / ideal, 3),
        "peak_in_flight": harness.peak_overlap((started[i], ends[i]) for i in ids
                                               if i in started),
        "all_started_after_s": round(first_wave[-1] - released, 3) if first_wave else None,
        "task_wall_p50_s": round(harness.percentile(durations, 50), 3),
        "task_wall_p99_s": round(harness.percentile(durations, 99), 3),
        "worker_cpu_pct": round(100 * (cpu1 - cpu0) / makespan, 1),
        "worker_cpu_ms_per_task": round(1000 * (cpu1 - cpu0) / n, 2),
        "rss_idle_mb": harness.mb(rss_idle),
        "peak_rss_mb": harness.mb(peak_rss),
    }


def _prefork(b: Bench, sizes: Any) -> dict[str, Any]:
    """The naive deployment on the same load as the target level, for a bounded window."""
    processes = sizes.prefork_processes
    queue = f"bench.prefork.{uuid.uuid4().hex[:6]}"
    spec = WorkerSpec("sandqueue", "prefork", processes, queue, tag=f"prefork{processes}")
    n = sizes.prefork_load_level * sizes.density_waves
    with b.worker(spec, warmup=processes * 4) as w:
        rss_idle = w.rss()
        ids = b.publish("sandqueue", _tasks(n, sizes), f"{queue}.staging", queue)
        released = b.redis.release(f"{queue}.staging", queue)
        time.sleep(max(0.0, released + sizes.prefork_window_s - time.time()))
        done_n = b.redis.count_done(ids)
        window = time.time() - released
        peak_rss = w.peak_rss()
        peak_pss = w.peak_pss()
    rate = done_n / window
    return {
        "processes": processes,
        "tasks": n,
        "worker": spec.describe(),
        "window_s": round(window, 2),
        "completed_in_window": done_n,
        "tasks_per_s": round(rate, 2),
        "projected_makespan_s": round(n / rate, 1) if rate else None,
        "ideal_s_at_200": round(n * sizes.task_s / sizes.prefork_load_level, 2),
        "peak_in_flight": processes,
        "rss_idle_mb": harness.mb(rss_idle),
        "peak_rss_mb": harness.mb(peak_rss),
        "peak_pss_mb": harness.mb(peak_pss),
    }


def run(sizes: Any) -> dict[str, Any]:
    levels = []
    with Bench() as b:
        for concurrency in sizes.density_levels:
            entry = _level(b, concurrency, sizes)
            if concurrency == TARGET_LEVEL:
                entry["target"] = (f"makespan <= {TARGET_MAKESPAN_RATIO}x ideal, "
                                   f"RSS < {TARGET_RSS_MB} MB")
                entry["met"] = (entry["succeeded"] == entry["tasks"]
                                and entry["makespan_ratio"] <= TARGET_MAKESPAN_RATIO
                                and entry["peak_rss_mb"] < TARGET_RSS_MB
                                and entry["peak_in_flight"] >= TARGET_LEVEL)
            levels.append(entry)
        prefork = _prefork(b, sizes)
    return {"task_s": sizes.task_s, "create_s": sizes.create_s,
            "waves": sizes.density_waves, "levels": levels, "prefork": prefork}
