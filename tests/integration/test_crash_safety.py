"""Crash safety through real workers: kill -9, SIGTERM, orphaned sandboxes, a Redis restart,
racing submits. Short leases (3 s) and intervals keep the waits small; every wait has a
timeout. The figures measured (recovery time after kill -9, shutdown time) are printed
(`pytest -s`) and named in the assertion messages.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import states

from producer.api import Client
from sandqueue import keys
from sandqueue.contract import TaskStatus
from tests.integration.conftest import (
    QUEUE,
    RestartableRedis,
    RunCli,
    StartWorker,
    Worker,
    assert_no_live_sandboxes,
    close_client,
    make_client,
    product_env,
    run_cli,
    sim_counts,
    task_events,
    task_record,
    wait_for_recovery_cycle,
    wait_until,
    wait_until_queue_drained,
)

pytestmark = pytest.mark.integration

LEASE_TTL_S = 3.0
RECOVER_INTERVAL_S = 1.0
SHUTDOWN_GRACE_S = 1.0
CRASH_ENV: dict[str, str | None] = {
    "SANDQUEUE_LEASE_TTL_S": str(LEASE_TTL_S),
    "SANDQUEUE_RECOVER_INTERVAL_S": str(RECOVER_INTERVAL_S),
    "SANDQUEUE_REAP_INTERVAL_S": "2",
    "SANDQUEUE_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
    # The scripted agent is silent between its steps: no stall verdict on long tasks.
    "SANDQUEUE_STALL_TIMEOUT_S": "60",
}
# README: a dead worker's tasks are back within 2 x lease + recovery interval (7 s here). The
# bound a test waits for is generous (a loaded machine is slow, not broken): it still fails
# a recovery that never comes or waits for the broker's visibility timeout (hours).
RECOVERY_BOUND_S = 60.0


def running_on(rdb: redis.Redis, task_id: str, worker: Worker) -> bool:
    """The task is running on `worker` and its sandbox exists."""
    record = task_record(rdb, task_id)
    return (record.get("status") == TaskStatus.RUNNING.value
            and record.get("worker", "").startswith(f"{worker.name}@")
            and bool(record.get("sandbox_id"))
            and rdb.sismember(keys.SIM_LIVE, record["sandbox_id"]) == 1)


def started_on(rdb: redis.Redis, task_id: str, worker: Worker) -> dict | None:
    """The `started` event `worker` published for this task, if any."""
    for event in task_events(rdb, task_id):
        if event.get("phase") == "started" and \
                str(event.get("worker", "")).startswith(f"{worker.name}@"):
            return event
    return None


def kill_9(worker: Worker) -> float:
    """SIGKILL the worker process; returns the wall-clock time of the kill."""
    at = time.time()
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)
    return at


# -- kill -9 ----------------------------------------------------------------------------------

def test_kill_9_task_completes_on_another_worker(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    first = worker_factory(concurrency=2, env=CRASH_ENV)
    handle = api_client.submit("Survive a kill -9", envs={"SIM_LATENCY_S": "6"})
    wait_until(lambda: running_on(rdb, handle.id, first), 15, "the task to run on worker 1")
    first_sandbox = task_record(rdb, handle.id)["sandbox_id"]
    second = worker_factory(concurrency=2, env=CRASH_ENV)  # started after 1 took the task

    killed_at = kill_9(first)
    event = wait_until(lambda: started_on(rdb, handle.id, second), RECOVERY_BOUND_S,
                       "the task to start again on worker 2")
    recovery_s = event["ts"] - killed_at
    print(f"\nkill -9 -> running again on another worker: {recovery_s:.2f}s "
          f"(lease {LEASE_TTL_S:g}s, recovery interval {RECOVER_INTERVAL_S:g}s)")
    assert event["delivery"] == 2

    result = handle.wait(timeout=30)
    assert result.status is TaskStatus.SUCCEEDED, (result.error, f"recovery {recovery_s:.2f}s")
    assert result.attempts == 2
    assert result.sandbox_id != first_sandbox
    # The killed attempt's sandbox had no owner left: the surviving worker's reaper kills it.
    wait_until(lambda: sim_counts(rdb) == (0, 2, 2), 10,
               lambda: f"the orphaned sandbox {first_sandbox} to be reaped: {sim_counts(rdb)}")
    assert f"reaped sandbox {first_sandbox}" in second.log()
    assert task_record(rdb, handle.id)["status"] == TaskStatus.SUCCEEDED.value


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "retry_after_side_effects"])
def test_kill_9_after_a_tool_call(cli: RunCli, rdb: redis.Redis, worker_factory: StartWorker,
                                  opt_in: bool) -> None:
    """The side-effect rule holds across a crash: a re-delivered task whose agent had made a
    tool call is not run again unless the task opted in."""
    first = worker_factory(concurrency=2, env=CRASH_ENV)
    args = ["submit", "Open one issue", "--env", "SIM_TOOL_CALLS=3", "--env", "SIM_LATENCY_S=4",
            "--json"]
    code, out, err = cli(*args, *(["--retry-after-side-effects"] if opt_in else []))
    assert code == 0, err
    task_id = json.loads(out)["id"]
    wait_until(lambda: int(task_record(rdb, task_id).get("tool_calls") or 0) >= 1, 15,
               "the agent's first tool call")
    assert running_on(rdb, task_id, first)
    # Killed before the second worker starts: a worker takes seconds to start on a loaded
    # machine, by which time the 4 s task could have finished on the first one.
    kill_9(first)
    calls_at_kill = int(task_record(rdb, task_id)["tool_calls"])
    second = worker_factory(concurrency=2, env=CRASH_ENV)

    code, out, err = cli("result", task_id, "--wait", "--wait-timeout", "40", "--json")
    assert out.strip(), f"no result (exit {code}): {err}"
    result = json.loads(out)
    assert started_on(rdb, task_id, second), "the task was not re-delivered to worker 2"
    if not opt_in:
        assert code == 1, err
        assert result["status"] == "failed"
        assert result["error"]["category"] == "worker_lost", result["error"]
        assert "tool call" in result["error"]["message"]
        assert sum(c["count"] for c in result["tool_calls"]) == calls_at_kill >= 1, result
        assert sim_counts(rdb)[1] == 1, "the task ran again after a side effect"
        wait_until(lambda: sim_counts(rdb) == (0, 1, 1), 10,
                   lambda: f"the crashed attempt's sandbox to be reaped: {sim_counts(rdb)}")
    else:
        assert code == 0, (result.get("error"), err)
        assert result["status"] == "succeeded"
        assert result["attempts"] == 2
        assert sum(c["count"] for c in result["tool_calls"]) == 3  # the second run, in full
        wait_until(lambda: sim_counts(rdb) == (0, 2, 2), 10,
                   lambda: f"the crashed attempt's sandbox to be reaped: {sim_counts(rdb)}")


# -- lease renewal ----------------------------------------------------------------------------

def test_a_task_longer_than_two_leases_runs_once_on_a_healthy_worker(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    """The worker running a long task renews its lease, so recovery (which the other worker
    runs too) never takes the task for an orphan: one delivery, one sandbox."""
    # Given two healthy workers and a task longer than two leases plus a recovery interval
    workers = [worker_factory(concurrency=2, env=CRASH_ENV) for _ in range(2)]
    run_s = 2 * LEASE_TTL_S + RECOVER_INTERVAL_S + 6
    handle = api_client.submit("Outlive two leases", envs={"SIM_LATENCY_S": str(run_s)})
    runner = wait_until(lambda: next((w for w in workers if running_on(rdb, handle.id, w)),
                                     None), 15, "the task to run")
    delivered_at = float(task_record(rdb, handle.id)["started_at"])

    # When recovery has run after the task's message became old enough to look orphaned
    # (while the task still runs: otherwise this test proves nothing)
    wait_for_recovery_cycle(rdb, delivered_at + 2 * LEASE_TTL_S, RECOVER_INTERVAL_S)
    assert handle.result() is None, (
        f"the task ended before recovery could look at it; raise its {run_s:g} s run time")
    assert running_on(rdb, handle.id, runner), task_record(rdb, handle.id)

    # Then it runs to its end once, on the worker that took it
    result = handle.wait(timeout=run_s + 60)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 1
    assert [e["phase"] for e in task_events(rdb, handle.id)].count("started") == 1
    record = task_record(rdb, handle.id)
    assert record["deliveries"] == "1" and "recovered_at" not in record, record
    assert sim_counts(rdb) == (0, 1, 1), "the task ran in more than one sandbox"
    for worker in workers:
        assert "put back on the queue" not in worker.log()
        assert "lease lost" not in worker.log()


# -- SIGTERM ----------------------------------------------------------------------------------

def test_sigterm_hands_the_task_back_and_it_finishes_elsewhere(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    first = worker_factory(concurrency=2, env=CRASH_ENV)
    handle = api_client.submit("Long enough to outlive the grace period",
                               envs={"SIM_LATENCY_S": "5"})
    wait_until(lambda: running_on(rdb, handle.id, first), 15, "the task to run on worker 1")

    started = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    try:  # generous: the task (5 s) must not run to its end, and the worker must exit
        first.proc.wait(SHUTDOWN_GRACE_S + 30)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not exit within 30 s after its grace period")
    exit_s = time.monotonic() - started
    print(f"\nSIGTERM -> worker exited after {exit_s:.2f}s (grace {SHUTDOWN_GRACE_S:g}s)")
    assert first.proc.returncode == 0, first.log()[-3000:]

    # Handed back, not lost and not failed: queued again, its sandbox killed.
    record = task_record(rdb, handle.id)
    assert record["status"] == TaskStatus.QUEUED.value, record
    assert "handed_back" in [e["phase"] for e in task_events(rdb, handle.id)]
    assert rdb.llen(QUEUE) == 1
    assert sim_counts(rdb) == (0, 1, 1)
    assert handle.result() is None

    second = worker_factory(concurrency=2, env=CRASH_ENV)
    result = handle.wait(timeout=30)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 2
    assert started_on(rdb, handle.id, second)
    assert sim_counts(rdb) == (0, 2, 2)


# -- sandqueue reap ---------------------------------------------------------------------------

def test_reap_cli_kills_a_sandbox_orphaned_by_kill_9(
    cli: RunCli, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    # Only the CLI reaps here: the worker's own reaper runs at start-up and then not for 10 min.
    env = {**CRASH_ENV, "SANDQUEUE_REAP_INTERVAL_S": "600"}
    cli_env = {"SANDQUEUE_LEASE_TTL_S": str(LEASE_TTL_S)}  # the CLI judges with the same lease
    worker = worker_factory(concurrency=2, env=env)
    code, out, err = cli("submit", "Be orphaned", "--env", "SIM_LATENCY_S=30", "--json")
    assert code == 0, err
    task_id = json.loads(out)["id"]
    wait_until(lambda: running_on(rdb, task_id, worker), 15, "the task to run")
    sandbox_id = task_record(rdb, task_id)["sandbox_id"]

    # While its worker lives, the sandbox is in use: the dry run names no reason.
    code, out, err = cli("reap", "--dry-run", "--json", env=cli_env)
    assert code == 0, err
    assert json.loads(out)["sandboxes"] == [
        {"sandbox_id": sandbox_id, "task_id": task_id, "reason": None, "killed": False}]

    kill_9(worker)
    # Its lease expires (3 s) and the sandbox is older than 2 leases: an orphan.
    created = json.loads(rdb.get(keys.sim_sandbox(sandbox_id)) or b"{}")["started_at"]
    time.sleep(max(0.0, created + 2 * LEASE_TTL_S + 0.5 - time.time()))
    wait_until(lambda: (rdb.zscore(keys.RUNNING, task_id) or 0) < time.time(), 5,
               "the dead worker's lease to expire")

    code, out, err = cli("reap", "--dry-run", "--json", env=cli_env)
    assert code == 0, err
    report = json.loads(out)
    assert report["dry_run"] is True
    assert report["live"] == 1
    [verdict] = report["sandboxes"]
    assert verdict["sandbox_id"] == sandbox_id
    assert verdict["task_id"] == task_id
    assert verdict["reason"] and "lease" in verdict["reason"], verdict
    assert verdict["killed"] is False
    assert sim_counts(rdb) == (1, 1, 0), "a dry run killed something"

    code, out, err = cli("reap", env=cli_env)
    assert code == 0, err
    assert "1 killed" in out and sandbox_id in out, out
    assert sim_counts(rdb) == (0, 1, 1)

    code, out, err = cli("reap", "--json", env=cli_env)  # nothing left to do
    assert code == 0, err
    assert json.loads(out) == {"dry_run": False, "live": 0, "sandboxes": []}


# -- Redis restart ----------------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 4], ids=["busy_worker", "worker_with_free_slots"])
def test_redis_restart_with_append_only_loses_nothing(
    aof_redis: RestartableRedis, aof_worker_factory: StartWorker, tmp_path: Path,
    concurrency: int,
) -> None:
    """Redis stops and starts again under a worker running one task (all its slots busy, or
    free slots left as usual): the worker reconnects by itself, nothing queued or finished is
    lost, nothing runs twice, and a producer gets exit 3 while Redis is down."""
    later = "sqit-after-restart"  # consumed only by a worker started after the restart
    client = make_client(aof_redis.url)
    r = aof_redis.client()
    try:
        worker = aof_worker_factory(concurrency=concurrency, env=CRASH_ENV)
        pid = worker.proc.pid
        before = client.submit("Finished before the restart").wait(timeout=30)
        assert before.status is TaskStatus.SUCCEEDED
        queued = [client.submit(f"Queued before the restart {i}", queue=later)
                  for i in range(3)]
        slow = client.submit("In flight across the restart", envs={"SIM_LATENCY_S": "2.5"})
        # Its sandbox recorded (the worker writes progress a few ms behind).
        wait_until(lambda: running_on(r, slow.id, worker), 15, "the slow task to start")
        delivered_at = float(task_record(r, slow.id)["started_at"])
        assert r.llen(later) == 3
        r.close()

        aof_redis.down()
        try:
            started = time.monotonic()
            code, out, err = run_cli(aof_redis.url, "submit", "While Redis is down", "--json",
                                     cwd=tmp_path, timeout=30)
            down_s = time.monotonic() - started
        finally:
            aof_redis.up()
        print(f"\nsubmit while Redis was down: exit {code} after {down_s:.2f}s")
        assert code == 3, (out, err)
        assert "cannot reach Redis" in err
        assert down_s < 20, f"the producer took {down_s:.1f}s to report Redis down"

        # The same worker process, reconnected: it finishes its task and takes new ones.
        wait_until(lambda: not worker.alive() or slow.result() is not None, 30,
                   "the task in flight to finish")
        after = client.submit("After the restart")
        wait_until(lambda: not worker.alive() or after.result() is not None, 30,
                   "the worker to take a task submitted after the restart")
        crash = [line for line in worker.log().splitlines() if "Unrecoverable error" in line]
        assert worker.alive() and not crash and after.result() is not None, (
            f"the worker (concurrency {concurrency}, one task in flight) did not survive the "
            f"Redis restart: {'running' if worker.alive() else 'exited'}, {crash}")
        assert worker.proc.pid == pid
        assert slow.wait(timeout=5).status is TaskStatus.SUCCEEDED
        assert after.wait(timeout=5).status is TaskStatus.SUCCEEDED
        assert client.get(before.task_id).result() == before  # written before, read after

        # Queued before the restart: kept by the append-only file, run now.
        aof_worker_factory(concurrency=4, queue=later, env=CRASH_ENV)
        results = [h.wait(timeout=30) for h in queued]
        assert [x.status for x in results] == [TaskStatus.SUCCEEDED] * 3

        r = aof_redis.client()
        # Nothing ran twice, also once recovery has looked at the unacknowledged message of
        # the task that was in flight (older than two leases): one sandbox per task.
        wait_for_recovery_cycle(r, delivered_at + 2 * LEASE_TTL_S, RECOVER_INTERVAL_S)
        assert [e["phase"] for e in task_events(r, slow.id)].count("started") == 1, \
            "the task in flight during the restart ran again"
        assert task_record(r, slow.id)["status"] == TaskStatus.SUCCEEDED.value
        assert slow.result() == slow.wait(timeout=5)
        wait_until(lambda: sim_counts(r) == (0, 6, 6), 15,
                   lambda: f"one sandbox per task, all killed: {sim_counts(r)}")
        assert_no_live_sandboxes(r)
    finally:
        r.close()
        close_client(client)


def test_a_task_finishing_while_redis_is_down_keeps_its_result(
    aof_redis: RestartableRedis, aof_worker_factory: StartWorker
) -> None:
    """The agent made a tool call and finished while Redis was down: once Redis is back the
    task's result is stored (not lost), and the task is neither run again nor reported
    `worker_lost` when recovery later finds its unacknowledged message."""
    client = make_client(aof_redis.url)
    r = aof_redis.client()
    try:
        worker = aof_worker_factory(concurrency=2, env=CRASH_ENV)
        handle = client.submit("Finish during the outage",
                               envs={"SIM_TOOL_CALLS": "1", "SIM_LATENCY_S": "1.5"})
        wait_until(lambda: running_on(r, handle.id, worker)
                   and int(task_record(r, handle.id).get("tool_calls") or 0) == 1, 15,
                   "the agent's tool call")
        delivered_at = float(task_record(r, handle.id)["started_at"])
        r.close()
        aof_redis.down()
        try:  # until the worker has finished the task (its final writes wait for Redis)
            wait_until(lambda: f"task {handle.id} succeeded" in worker.log(), 60,
                       "the task to finish while Redis is down")
        finally:
            aof_redis.up()
        assert worker.alive()
        result = handle.wait(timeout=30)
        assert result.status is TaskStatus.SUCCEEDED, (
            f"a task that finished while Redis was down ended {result.status.value}: "
            f"{result.error}")
        assert result.attempts == 1
        r = aof_redis.client()
        # Recovery looks at unacknowledged messages older than two leases: still one run.
        wait_for_recovery_cycle(r, delivered_at + 2 * LEASE_TTL_S, RECOVER_INTERVAL_S)
        assert handle.result() == result, "the result changed after recovery"
        # The final state is written behind (retried until Redis is back): it may land a
        # moment after the result, whose store retries on its own schedule.
        wait_until(lambda: task_record(r, handle.id)["status"] == TaskStatus.SUCCEEDED.value,
                   30, lambda: f"the record to say succeeded: {task_record(r, handle.id)}")
        assert [e["phase"] for e in task_events(r, handle.id)].count("started") == 1
        assert sim_counts(r)[1] == 1, "the task ran again"
        # Its sandbox is gone. Not `created == killed`: the worker's own kill is recorded
        # behind (after the outage), and meanwhile the reaper may see the sandbox without a
        # lease and kill it again; the simulator counts both kills.
        wait_until(lambda: sim_counts(r)[0] == 0, 15,
                   lambda: f"the sandbox to be killed: {sim_counts(r)}")
    finally:
        r.close()
        close_client(client)


# -- racing submits ---------------------------------------------------------------------------

def stdin_blocked(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process waits on its stdin pipe (Linux), so the race starts together."""
    try:
        return "pipe" in Path(f"/proc/{proc.pid}/wchan").read_text()
    except OSError:
        return True


def test_concurrent_submits_with_one_idempotency_key_run_once(
    rdb: redis.Redis, redis_url: str, worker_factory: StartWorker, tmp_path: Path
) -> None:
    worker = worker_factory(concurrency=4)
    key = f"sqit-race-{uuid.uuid4().hex}"
    argv = [sys.executable, "-m", "producer.cli", "submit", "-", "--idempotency-key", key,
            "--json"]
    # Each process reads its prompt from stdin: they all start, import and then block there,
    # and are released together by closing their stdin.
    outs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(8)]
    procs = []
    try:
        for out_path, err_path in outs:
            with out_path.open("wb") as out, err_path.open("wb") as err:
                procs.append(subprocess.Popen(argv, env=product_env(redis_url), cwd=tmp_path,
                                              stdin=subprocess.PIPE, stdout=out, stderr=err))
        # Generous: eight Pythons importing at once take a while on a loaded machine.
        wait_until(lambda: all(stdin_blocked(p) for p in procs), 120,
                   "the submitters to wait on stdin")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"Run me once")
            proc.stdin.close()
        for proc in procs:
            proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    answers = []
    for proc, (out_path, err_path) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err_path.read_text()
        answers.append(json.loads(out_path.read_text()))
    ids = {a["id"] for a in answers}
    assert len(ids) == 1, f"one idempotency key gave several tasks: {answers}"
    assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 7
    [task_id] = ids

    client = make_client(redis_url)
    try:
        result = client.get(task_id).wait(timeout=30)
        assert result.status is TaskStatus.SUCCEEDED
        assert [k.decode() for k in rdb.scan_iter("sq:task:*")] == [keys.task(task_id)]
        # Had a second copy been enqueued, it is delivered before the sentinel: it would have
        # run (a second sandbox) or been logged as a duplicate.
        wait_until_queue_drained(client, rdb)
    finally:
        close_client(client)
    # A submitter that found the task still `submitting` (a racing one had not confirmed
    # its publish yet) publishes it again, by design: an interrupted submit must never
    # strand a task. Such a copy is acknowledged and dropped, never run.
    assert worker.log().count(f"Task sandqueue.run_agent_task[{task_id}] succeeded") == 1
    assert sim_counts(rdb) == (0, 2, 2), "one sandbox for the task, one for the sentinel"
    assert rdb.get(f"celery-task-meta-{task_id}") is not None
    assert json.loads(rdb.get(f"celery-task-meta-{task_id}"))["status"] == states.SUCCESS
