"""The README's main job: `sandqueue demo` starts what it needs, runs a task, stops it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in {"REDIS_URL", "E2B_API_KEY", "ANTHROPIC_API_KEY"}
            and not k.startswith("SANDQUEUE_")}


def _run(code: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=180, check=False)


def _run_watching_children(code: list[str], tmp_path: Path
                           ) -> tuple[subprocess.CompletedProcess[str], dict[psutil.Process, str]]:
    """Run, and note every process it starts while it runs (sampled every 50 ms: its
    redis-server and worker live for seconds). Only this run's own descendants are looked at,
    never the machine's other processes (other tests or users may run a redis-server too)."""
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, *code], cwd=tmp_path, env=_env(),
                                stdout=stdout, stderr=stderr, text=True)
        seen: dict[psutil.Process, str] = {}  # each process with its command line
        try:
            parent = psutil.Process(proc.pid)
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    for child in parent.children(recursive=True):
                        if child not in seen:
                            seen[child] = _describe(child)
                except psutil.NoSuchProcess:
                    pass
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                       err.read_text())
    return done, seen


def _describe(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return f"pid {process.pid}"


def test_demo_runs_a_task_and_stops_what_it_started(tmp_path: Path) -> None:
    done, started = _run_watching_children(["-m", "producer.cli", "demo", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["simulated"] is True
    assert "SIMULATED" in done.stderr
    assert "started redis-server" in done.stderr
    assert any("redis-server" in line for line in started.values()), (
        f"the demo's redis-server was never seen among its processes: {started}")
    # Everything it started has stopped (a moment's grace for a process already exiting).
    _, alive = psutil.wait_procs(list(started), timeout=10)
    for process in alive:  # this test's own leftovers only, so a failure leaks nothing
        process.kill()
    assert not alive, f"the demo left processes running: {[started[p] for p in alive]}"


def test_demo_falls_back_to_an_embedded_redis_without_redis_server(tmp_path: Path) -> None:
    """On a machine without redis-server, the demo still runs (on fakeredis, slower)."""
    script = textwrap.dedent("""
        import sys
        import sandqueue.localredis as local
        local.shutil.which = lambda name: None
        from producer.demo import run_demo
        sys.exit(run_demo(None, True))
    """)
    done = _run(["-c", script], tmp_path)
    if done.returncode != 0 and "lupa" in done.stderr:
        pytest.fail("fakeredis needs its Lua extra (fakeredis[lua]) for Celery's transport")
    assert done.returncode == 0, done.stderr
    assert "fakeredis" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "succeeded"
