"""Live progress and cancellation through real workers: `sandqueue watch`, `handle.events()`,
`sandqueue cancel` of running and queued tasks, `sandqueue batch cancel`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.api import Client
from sandqueue import keys
from sandqueue.contract import TaskStatus
from tests.integration.conftest import (
    RunCli,
    StartWorker,
    Worker,
    product_env,
    sim_counts,
    task_events,
    task_record,
    wait_until,
)

pytestmark = pytest.mark.integration

PHASES = ["queued", "started", "sandbox_created", "agent_started",
          "agent_text", "tool_call",  # the model says what it does, then calls a tool
          "agent_text", "tool_call", "agent_text", "result"]


@pytest.fixture(scope="module")
def worker(module_worker_factory: StartWorker) -> Worker:
    # The scripted agent is silent between steps: no stall verdict on the 30 s tasks here.
    return module_worker_factory(concurrency=8, env={"SANDQUEUE_STALL_TIMEOUT_S": "60"})


def submit_id(cli: RunCli, *args: str) -> str:
    code, out, err = cli("submit", *args, "--json")
    assert code == 0, err
    return str(json.loads(out)["id"])


def assert_in_order(events: list[dict[str, Any]], phases: list[str]) -> None:
    assert [e["phase"] for e in events] == phases, events
    stamps = [float(e["ts"]) for e in events]
    assert stamps == sorted(stamps), f"timestamps go back: {stamps}"


# -- watch / events ---------------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
def test_watch_json_follows_the_phases_live_and_exits_with_the_result(
    cli: RunCli, redis_url: str, tmp_path: Path
) -> None:
    task_id = submit_id(cli, "Two tool calls, then an answer", "--env", "SIM_TOOL_CALLS=2",
                        "--env", "SIM_LATENCY_S=1.5")
    # Started while the task runs: what it prints arrives as it happens.
    watch = subprocess.run([sys.executable, "-m", "producer.cli", "watch", task_id, "--json"],
                           env=product_env(redis_url), cwd=tmp_path, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=60)
    assert watch.returncode == 0, watch.stderr.decode()
    lines = [json.loads(line) for line in watch.stdout.decode().splitlines()]
    *events, final = lines
    assert_in_order(events, PHASES)
    assert [e["name"] for e in events if e["phase"] == "tool_call"] == ["Bash", "Bash"]
    assert events[-1]["status"] == "succeeded"
    assert "Two tool calls, then an answer" in [
        e["text"] for e in events if e["phase"] == "agent_text"][-1]  # the answer echoes it
    assert final["phase"] == "final"
    assert final["result"]["task_id"] == task_id
    assert final["result"]["status"] == "succeeded"
    # The events span the run: the tool calls came while the agent worked, not at the end.
    assert events[-1]["ts"] - events[3]["ts"] >= 1.2


@pytest.mark.usefixtures("worker")
def test_watch_exits_1_for_a_failing_task(cli: RunCli) -> None:
    task_id = submit_id(cli, "Fail", "--env", "SIM_FAIL=agent:is_error", "--env",
                        "SIM_LATENCY_S=0.3")
    code, out, err = cli("watch", task_id, "--json", "--timeout", "30")
    assert code == 1, err
    *events, final = [json.loads(line) for line in out.splitlines()]
    assert [e["phase"] for e in events][:2] == ["queued", "started"]
    assert events[-1] == {**events[-1], "phase": "result", "status": "failed",
                          "error": "agent_error"}
    assert final["result"]["status"] == "failed"
    assert final["result"]["error"]["category"] == "agent_error"

    code, _, err = cli("watch", str(uuid.uuid4()))
    assert code == 2, err


@pytest.mark.usefixtures("worker")
def test_handle_events_yields_the_same_phases_and_ends(api_client: Client) -> None:
    handle = api_client.submit("Events from Python", envs={"SIM_TOOL_CALLS": "2",
                                                           "SIM_LATENCY_S": "0.6"})
    events = list(handle.events(timeout=30))  # the timeout bounds it; no tighter clock
    assert_in_order(events, PHASES)
    assert events[-1]["status"] == "succeeded"
    assert handle.wait(timeout=5).status is TaskStatus.SUCCEEDED
    assert list(handle.events(timeout=5)) == events  # again, after the end: same, and ends


# -- cancel -----------------------------------------------------------------------------------

def test_cancel_a_running_task(cli: RunCli, rdb: redis.Redis, worker: Worker) -> None:
    # One tool call about every 1.5 s over 30 s: cancelled after the first.
    task_id = submit_id(cli, "Take your time", "--env", "SIM_LATENCY_S=30", "--env",
                        "SIM_TOOL_CALLS=20")
    wait_until(lambda: int(task_record(rdb, task_id).get("tool_calls") or 0) >= 1, 15,
               "the first tool call")
    assert rdb.scard(keys.SIM_LIVE) == 1

    code, out, err = cli("cancel", task_id)
    assert code == 0, err
    assert out.split() == [task_id, "cancel", "requested"]
    code, out, err = cli("result", task_id, "--wait", "--wait-timeout", "40", "--json")
    assert code == 1, err
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert result["error"]["category"] == "cancelled"
    # From the request (stamped in Redis) to the result, not two CLI start-ups: the worker
    # polls cancellations every second. Generous for a loaded machine; the agent runs 30 s.
    requested_at = rdb.zscore(keys.CANCELLED, task_id)
    assert requested_at is not None
    reaction_s = result["finished_at"] - requested_at
    print(f"\ncancel of a running task -> result cancelled after {reaction_s:.2f}s")
    assert reaction_s < 15, f"cancelling a running task took {reaction_s:.2f}s"
    calls = sum(c["count"] for c in result["tool_calls"])
    assert 1 <= calls < 20, result["tool_calls"]  # the partial progress is kept
    assert calls == int(task_record(rdb, task_id)["tool_calls"])
    assert sim_counts(rdb) == (0, 1, 1)  # its sandbox was killed
    assert f"task {task_id} cancelled" in worker.log()


def test_cancel_a_queued_task_it_never_starts(cli: RunCli, rdb: redis.Redis,
                                              worker_factory: StartWorker) -> None:
    queue = "sqit-cancel-queued"  # no worker consumes it yet
    task_id = submit_id(cli, "Never run me", "--queue", queue)
    code, out, err = cli("cancel", task_id, "--json")
    assert code == 0, err
    assert json.loads(out) == {"tasks": [{"id": task_id, "outcome": "cancelled",
                                          "status": "cancelled"}]}
    code, out, err = cli("status", task_id)
    assert out.split()[:2] == [task_id, "cancelled"]  # at once: no worker holds it

    worker_factory(concurrency=2, queue=queue)
    code, out, err = cli("result", task_id, "--wait", "--wait-timeout", "30", "--json")
    assert code == 1, err
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert result["sandbox_id"] is None
    assert sim_counts(rdb) == (0, 0, 0), "a sandbox was created for a cancelled task"
    assert "sandbox_created" not in [e["phase"] for e in task_events(rdb, task_id)]

    code, out, err = cli("cancel", task_id)  # it has ended: nothing to cancel, exit 5
    assert code == 5, (out, err)
    assert out.strip() == f"{task_id} already ended (cancelled); nothing to cancel"

    unknown = str(uuid.uuid4())
    code, out, err = cli("cancel", unknown)
    assert code == 2, (out, err)


@pytest.mark.usefixtures("worker")
def test_batch_cancel_ends_every_unfinished_task_cancelled(
    cli: RunCli, rdb: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    total = 10  # the worker runs 8 at once: 8 running, 2 queued
    source = tmp_path / "inputs.jsonl"
    source.write_text("".join(
        json.dumps({"id": f"b{i}", "prompt": f"Item {i}", "envs": {"SIM_LATENCY_S": "30"}})
        + "\n" for i in range(total)), encoding="utf-8")
    out = tmp_path / "results.jsonl"
    batch_id = f"sqit-{uuid.uuid4().hex[:12]}"
    with (tmp_path / "run.out").open("wb") as stdout, (tmp_path / "run.err").open("wb") as err:
        run = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "batch", "run", str(source), "--out",
             str(out), "--batch-id", batch_id, "--json", "--no-progress"],
            env=product_env(redis_url), cwd=tmp_path, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=err)
    try:
        wait_until(lambda: rdb.scard(keys.SIM_LIVE) == 8, 20, "8 tasks of the batch to run")
        started = time.monotonic()
        code, stdout_text, err_text = cli("batch", "cancel", batch_id)
        assert code == 0, err_text
        assert f"cancel requested for {total} task(s)" in stdout_text
        run.wait(30)
        elapsed = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
    print(f"\nbatch cancel -> batch command ended after {elapsed:.2f}s")
    assert run.returncode == 1, (tmp_path / "run.err").read_text()
    summary = json.loads((tmp_path / "run.out").read_text())
    assert summary["by_status"] == {"cancelled": total}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(f"b{i}" for i in range(total))
    assert {line["status"] for line in lines} == {"cancelled"}
    # Generous (a loaded machine); far below the tasks' 30 s, which by_status also guards.
    assert elapsed < 20, f"cancelling the batch took {elapsed:.2f}s to end its tasks"
    assert sim_counts(rdb) == (0, 8, 8)  # the 2 queued ones never got a sandbox
    code, stdout_text, err_text = cli("batch", "status", batch_id, "--json")
    assert code == 0, err_text
    status = json.loads(stdout_text)
    assert status["status"] == "cancelled"
    assert status["by_status"] == {"cancelled": total, "unsubmitted": 0}
