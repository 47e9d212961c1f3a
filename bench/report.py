"""Turn a run's results into Markdown tables: printed, written to bench/out/report.md, and
pasted into BENCHMARKS.md. One renderer for both so the document and the run never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "met" if v else "**missed**"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}".removesuffix(".0")
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(m: dict[str, Any]) -> str:
    return "\n".join([
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['virtualisation']}), RAM {m['ram_gib']} GiB",
        f"- OS: {m['os']}; Python {m['python']}; redis-server {m['redis_server']}",
        f"- celery {m['celery']}, kombu {m['kombu']}, redis-py {m['redis_py']}, "
        f"pydantic {m['pydantic']}, sandqueue {m['sandqueue']} (git {m.get('git', '?')})",
        f"- load average at start {m['loadavg_start']}, at end {m.get('loadavg_end', '?')}",
    ])


def _top(rows: Sequence[dict[str, Any]], n: int, what: str = "share of busy samples") -> str:
    return table([what, "function (file)"],
                 [(f"{r['pct']}%", f"`{r['name']}`") for r in rows[:n]])


def overhead(res: dict[str, Any]) -> str:
    out = ["### 1. Overhead (zero-time sim tasks vs bare Celery no-ops)", ""]
    out.append(table(
        ["pool", "concurrency", "bare Celery tasks/s", "sandqueue tasks/s", "ratio",
         "target", "result"],
        [(c["pool"], c["concurrency"], c["systems"]["bare"]["throughput_tps"],
          c["systems"]["sandqueue"]["throughput_tps"], c["ratio"], f">= {c['target']}x",
          c["met"]) for c in res["configs"]]))
    out += ["", "Per task (median round; producer = enqueueing side, worker = consuming side):",
            ""]
    rows = []
    for c in res["configs"]:
        for kind, s in c["systems"].items():
            r = s["rounds"][len(s["rounds"]) // 2]
            p, w = r["producer_redis"], r["worker_redis"]
            rows.append((f"{kind} ({c['pool']} {c['concurrency']})", p["commands"],
                         w["commands"], p["requests"], w["requests"],
                         p["bytes_in"] + w["bytes_in"],
                         p["bytes_out"] + w["bytes_out"],
                         round(p["redis_cpu_ms"] + w["redis_cpu_ms"], 3),
                         r["worker_cpu_ms_per_task"], r["result_bytes"], s["peak_rss_mb"]))
    out.append(table(["system", "producer Redis cmds", "worker Redis cmds",
                      "producer requests", "worker requests", "bytes to Redis",
                      "bytes from Redis", "Redis CPU ms", "worker CPU ms",
                      "result JSON bytes", "worker peak RSS MB"], rows))
    for c in res["configs"]:
        for kind, s in c["systems"].items():
            if "trace" in s:
                t = s["trace"]
                out += ["", f"Redis commands per {kind} task, by key (MONITOR over "
                        f"{t['tasks']} tasks, {t['commands_per_task']} in all):", ""]
                out.append(table(["per task", "command and key"],
                                 [(v, f"`{k}`") for k, v in t["by_shape"].items()]))
            prof = s.get("profile")
            if prof and "error" not in prof:
                out += ["", f"Worker profile, {kind} ({c['pool']} {c['concurrency']}, "
                        f"{prof['tasks']} tasks, {prof['samples']} samples holding the GIL; "
                        f"stacks in `{prof['collapsed_stacks']}`). Self time by package:", ""]
                out.append(table(["package", "share"], [(r["name"], f"{r['pct']}%")
                                                        for r in prof["by_package_self"][:10]]))
                cpu = s["rounds"][len(s["rounds"]) // 2]["worker_cpu_ms_per_task"]
                if prof.get("tree"):
                    out += ["", f"Where the worker's busy time goes (sandqueue frames as a call "
                            f"tree; ms per task = share x {cpu} ms, the worker CPU per task "
                            "measured in the timed rounds):", "",
                            table(["function", "share", "ms/task", "of which in redis-py"],
                                  [("&nbsp;&nbsp;" * r["depth"] + f"`{r['name']}`",
                                    f"{r['pct']}%", round(r["pct"] * cpu / 100, 3),
                                    f"{r['redis_pct']}%") for r in prof["tree"]])]
                out += ["", "Hottest functions, self time:", "", _top(prof["self"], 12)]
            elif prof:
                out += ["", f"Profile of {kind}: unavailable ({prof['error']})"]
    return "\n".join(out)


def density(res: dict[str, Any]) -> str:
    out = [f"### 2. Density (one threads worker, sim sandboxes of {res['task_s']:g} s: "
           f"{res['create_s']:g} s create + {res['task_s'] - res['create_s']:g} s agent, "
           f"{res['waves']} waves)", ""]
    rows = [(lv["concurrency"], lv["tasks"], lv.get("succeeded"), lv["tasks_per_s"],
             lv["makespan_s"],
             lv["ideal_s"], lv["makespan_ratio"], lv["peak_in_flight"],
             lv["all_started_after_s"], lv.get("task_wall_p50_s"), lv.get("task_wall_p99_s"),
             lv["worker_cpu_pct"], lv["rss_idle_mb"],
             lv["peak_rss_mb"], lv.get("met")) for lv in res["levels"]]
    pf = res["prefork"]
    rows.append((f"prefork x{pf['processes']}", pf["tasks"], None, pf["tasks_per_s"],
                 f"{pf['projected_makespan_s']} (projected)", pf["ideal_s_at_200"],
                 round(pf["projected_makespan_s"] / pf["ideal_s_at_200"], 1)
                 if pf["projected_makespan_s"] else None, pf["peak_in_flight"], None, None,
                 None, None, pf["rss_idle_mb"], pf["peak_rss_mb"], None))
    out.append(table(["concurrency", "tasks", "succeeded", "tasks/s", "makespan s", "ideal s",
                      "ratio",
                      "peak in flight", "all slots busy after s", "task wall p50 s",
                      "task wall p99 s", "worker CPU %",
                      "idle RSS MB", "peak RSS MB", "target (200)"], rows))
    for lv in res["levels"]:
        if lv.get("failures"):
            out += ["", f"Failed tasks at concurrency {lv['concurrency']}:", "",
                    table(["tasks", "why"], [(v, f"`{k}`") for k, v in lv["failures"].items()])]
    out += ["", f"Prefork row: same load as the 200 level, measured for "
            f"{pf['window_s']} s ({pf['completed_in_window']} done); its ideal is the "
            "200-slot one, as that is what it is compared with; RSS is the sum over the "
            f"main process and its {pf['processes']} children (PSS, which counts pages they "
            f"share once: {pf.get('peak_pss_mb')} MB)."]
    return "\n".join(out)


def enqueue(res: dict[str, Any]) -> str:
    out = [f"### 3. Enqueue ({res['tasks']:,} tasks; target for batch paths: {res['target']})",
           ""]
    rows = []
    for m in res["methods"]:
        if "missing" in m:
            rows.append((m["method"], None, None, None, None, None, None,
                         f"not measured: {m['missing']}"))
            continue
        r = m.get("redis", {})
        verdict = m.get("error") or m.get("met") or ("reference" if m.get("reference")
                                                     else "baseline")
        if m.get("met") is False:
            verdict = False
        rows.append((m["method"], m["seconds"], m["tasks_per_s"], m.get("speedup_vs_loop"),
                     r.get("commands"), r.get("requests"), r.get("bytes_in"), verdict))
    out.append(table(["method", "seconds (best)", "tasks/s", "speed vs loop",
                      "Redis cmds/task", "Redis requests/task", "bytes to Redis/task", "result"],
                     rows))
    for name, prof in (res.get("producer_profiles") or {}).items():
        out += ["", f"Producer profile of `{name}` (cProfile, {prof['tasks']} tasks, "
                f"{prof['wall_s']} s under the profiler), cumulative share:", "",
                _top(prof["cumulative"], 15, "share of wall time")]
    return "\n".join(out)


def latency(res: dict[str, Any]) -> str:
    out = [f"### 4. Latency (submit to start, open loop at half capacity, threads "
           f"concurrency {res['concurrency']})", ""]
    rows = []
    for name, systems in res["scenarios"].items():
        for kind, s in systems.items():
            rows.append((name, kind, s["capacity_per_s"], s["offered_per_s"],
                         s["achieved_per_s"], s["tasks"], s["p50_ms"], s["p90_ms"],
                         s["p99_ms"], s["max_ms"]))
    out.append(table(["load", "system", "capacity/s", "offered/s", "achieved/s", "tasks",
                      "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
    return "\n".join(out)


RENDER = {"overhead": overhead, "density": density, "enqueue": enqueue, "latency": latency}


def render(results: dict[str, Any]) -> str:
    parts = ["## Machine", "", machine(results["machine"]), "",
             f"Command: `{results['command']}`; total {results['total_s']} s.", ""]
    for name, fn in RENDER.items():
        sec = results["sections"].get(name)
        if sec is None:
            continue
        if "error" in sec:
            parts += [f"### {name}: FAILED", "", "```", sec["error"], "```", ""]
            continue
        parts += [fn(sec), f"\n({name}: {sec.get('elapsed_s')} s)", ""]
    return "\n".join(parts)
