"""The README's main job: `sandqueue demo` starts what it needs, runs a task, stops it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _run(code: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"REDIS_URL", "E2B_API_KEY", "ANTHROPIC_API_KEY"}
           and not k.startswith("SANDQUEUE_")}
    return subprocess.run([sys.executable, *code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def _no_leftover_processes(marker: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False)
    return marker not in out.stdout


def test_demo_runs_a_task_and_stops_what_it_started(tmp_path: Path) -> None:
    done = _run(["-m", "producer.cli", "demo", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["simulated"] is True
    assert "SIMULATED" in done.stderr
    assert "started redis-server" in done.stderr
    assert _no_leftover_processes("sandqueue-redis-"), "the demo's redis-server is still running"


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
