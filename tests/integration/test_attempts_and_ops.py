"""Issue 8, worker side, through real workers: the attempt log across a kill -9 and a
SIGTERM hand-back (20), a clamped deadline (13), quiet logs and CLI output (18), task
events without prompts, the health check (21)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from producer.api import Client
from sandqueue import keys
from sandqueue.contract import TASK_NAME, TaskStatus
from sandqueue.store import TaskStore
from tests.integration.conftest import (
    RunCli,
    StartWorker,
    product_env,
    sim_counts,
    task_record,
    wait_until,
)
from tests.integration.test_crash_safety import (
    CRASH_ENV,
    SHUTDOWN_GRACE_S,
    kill_9,
    running_on,
    started_on,
)

pytestmark = pytest.mark.integration


# -- 20: the attempt log ---------------------------------------------------------------------

def test_a_rerun_after_kill_9_shows_the_lost_attempt_and_the_reapers_kill(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    first = worker_factory(concurrency=2, env=CRASH_ENV)
    handle = api_client.submit("Survive a kill -9", envs={"SIM_LATENCY_S": "4"})
    wait_until(lambda: running_on(rdb, handle.id, first), 15, "the task to run on worker 1")
    first_sandbox = task_record(rdb, handle.id)["sandbox_id"]
    second = worker_factory(concurrency=2, env=CRASH_ENV)
    kill_9(first)
    wait_until(lambda: started_on(rdb, handle.id, second), 30, "the rerun on worker 2")

    result = handle.wait(timeout=30)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 2
    lost, rerun = result.attempt_log
    assert (lost.attempt, lost.delivery, lost.outcome, lost.retried) == (1, 1, "worker_lost",
                                                                         True)
    assert lost.worker is not None and lost.worker.startswith(f"{first.name}@")
    assert lost.sandbox_id == first_sandbox
    assert lost.error is not None and "lease" in lost.error
    assert lost.sandbox_killed in (None, True)  # the reaper may not have come by yet
    assert (rerun.attempt, rerun.delivery, rerun.outcome) == (2, 2, "succeeded")
    assert rerun.worker is not None and rerun.worker.startswith(f"{second.name}@")
    assert rerun.sandbox_id == result.sandbox_id and rerun.sandbox_killed is True

    # Once the reaper has killed the orphan, the task's record says who killed it.
    wait_until(lambda: sim_counts(rdb) == (0, 2, 2), 20, "the orphaned sandbox to be reaped")
    stored = TaskStore.attempt_log(task_record(rdb, handle.id))
    assert [(e.attempt, e.outcome) for e in stored] == [(1, "worker_lost"), (2, "succeeded")]
    assert (stored[0].sandbox_killed, stored[0].killed_by) == (True, "reaper")


def test_sigterm_hands_back_with_one_log_line_per_task_and_a_logged_attempt(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    """Three tasks handed back: three one-line Reject messages, no traceback (issue 8.18);
    each rerun's attempt log says attempt 1 was handed back, its sandbox killed (8.20)."""
    first = worker_factory(concurrency=3, env=CRASH_ENV)
    handles = [api_client.submit(f"Outlive the grace period {i}", envs={"SIM_LATENCY_S": "6"})
               for i in range(3)]
    for handle in handles:
        wait_until(lambda h=handle: running_on(rdb, h.id, first), 15, "all three running")
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(SHUTDOWN_GRACE_S + 15)
    log = first.log()
    assert "Traceback" not in log, log[-4000:]
    rejects = [line for line in log.splitlines() if "reject requeue=True" in line]
    assert len(rejects) == 3, rejects
    assert {h.id for h in handles} == {line.split("[")[-1].split("]")[0] for line in rejects}

    worker_factory(concurrency=3, env=CRASH_ENV)
    for handle in handles:
        result = handle.wait(timeout=30)
        assert result.status is TaskStatus.SUCCEEDED, result.error
        back, rerun = result.attempt_log
        assert (back.outcome, back.retried, back.sandbox_killed, back.killed_by) == (
            "handed_back", True, True, "worker")
        assert rerun.outcome == "succeeded" and rerun.delivery == 2


# -- 13: a clamped deadline ------------------------------------------------------------------

def test_a_clamped_deadline_is_warned_about_at_submit_and_recorded(
    cli: RunCli, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    """Workers allow 100 s, the CLI (a producer with the default 3300 s) asks for 500 s."""
    worker_factory(concurrency=2, env={"SANDQUEUE_MAX_TIMEOUT_S": "100",
                                       "SANDQUEUE_DEFAULT_TIMEOUT_S": "60"})
    wait_until(lambda: rdb.hlen(keys.WORKER_LIMITS) == 1, 15, "the worker's advertised limit")
    code, out, err = cli("submit", "hi", "--timeout", "500", "--wait", "--json")
    assert code == 0, err
    assert "SANDQUEUE_MAX_TIMEOUT_S" in err and "100s deadline" in err, err
    result = json.loads(out)
    assert (result["timeout_s_requested"], result["timeout_s_applied"]) == (500, 100)
    assert len(result["warnings"]) == 1 and "100s deadline" in result["warnings"][0]


# -- 18: noise on the producer side ----------------------------------------------------------

def test_submit_wait_prints_the_simulated_banner_once_on_one_line(
        cli: RunCli, worker_factory: StartWorker) -> None:
    worker_factory(concurrency=2)
    code, out, err = cli("submit", "hi", "--wait", env={"COLUMNS": "60"})
    assert code == 0, err
    assert (out + err).count("SIMULATED") == 1, err
    banner = next(line for line in err.splitlines() if "SIMULATED" in line)
    assert banner.rstrip().endswith("for real runs"), err


def test_a_wait_timeout_leaves_no_ignored_exception_at_exit(redis_url: str,
                                                            tmp_path: Path) -> None:
    """No worker consumes this queue: wait() times out, and the process exits cleanly."""
    script = (
        "from producer.api import Client, WaitTimeout\n"
        "handle = Client().submit('nobody runs this', queue='nobody')\n"
        "try:\n"
        "    handle.wait(timeout=0.3)\n"
        "except WaitTimeout as e:\n"
        "    print('timed out:', e.message)\n"
    )
    for _ in range(2):  # the ignored exception showed on every run before the fix
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=product_env(redis_url), cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "timed out:" in proc.stdout and "within 0.3s" in proc.stdout
        assert "Exception ignored" not in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


# -- 21: task events without prompts; the health check ---------------------------------------

class EventCapture:
    """Celery task events, as Flower receives them, on a thread of the test process."""

    def __init__(self, redis_url: str) -> None:
        self.app = Celery("sq-events-test", broker=redis_url, set_as_current=False)
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._conn = self.app.connection()
        self._receiver = self.app.events.Receiver(self._conn,
                                                  handlers={"*": self.events.append})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventCapture:
        self._thread.start()
        assert self.ready.wait(15), "the event receiver did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self._receiver.should_stop = True  # checked at least every second
        self._thread.join(10)
        self._conn.release()
        self.app.close()

    def _run(self) -> None:
        for _ in self._receiver.consume(limit=None, timeout=None, wakeup=False):
            self.ready.set()

    def of(self, task_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("uuid") == task_id and e["type"] == kind]


def test_task_events_reach_monitors_without_prompt_or_result(
    redis_url: str, api_client: Client, worker_factory: StartWorker
) -> None:
    worker = worker_factory(concurrency=2, env={"SANDQUEUE_TASK_EVENTS": "true"})
    with EventCapture(redis_url) as capture:
        prompt = f"private-prompt-{uuid.uuid4().hex}"
        ours = api_client.submit(prompt)
        # Another sender's message carries a repr of its arguments (the prompt) in its headers.
        foreign_prompt = f"foreign-private-prompt-{uuid.uuid4().hex}"
        foreign = api_client.celery.send_task(
            TASK_NAME, args=[{"v": 1, "task": {"prompt": foreign_prompt}}], queue=worker.queue)
        for task_id in (ours.id, foreign.id):
            wait_until(lambda t=task_id: capture.of(t, "task-succeeded"), 30,
                       f"the task-succeeded event of {task_id}")
            (received,) = capture.of(task_id, "task-received")
            assert received["args"] == "(agent task)" and received["kwargs"] == "{}"
            (succeeded,) = capture.of(task_id, "task-succeeded")
            assert succeeded["result"] == "(agent result: succeeded)"
        foreign.forget()
    dumped = json.dumps(capture.events)
    assert prompt not in dumped and foreign_prompt not in dumped
    log = worker.log()
    assert prompt not in log and foreign_prompt not in log


def test_the_health_check_follows_the_worker(redis_url: str, worker_factory: StartWorker,
                                            tmp_path: Path) -> None:
    health = tmp_path / "worker.health"
    worker = worker_factory(concurrency=1, env={"SANDQUEUE_HEALTH_FILE": str(health)})

    def check(max_age_s: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.health", "--max-age", str(max_age_s)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env=product_env(redis_url, {"SANDQUEUE_HEALTH_FILE": str(health)}))

    wait_until(lambda: check().returncode == 0, 20, "the worker to report healthy")
    assert worker.name in check().stdout
    kill_9(worker)
    # No more beats: stale once the file is older than the (short) age allowed.
    wait_until(lambda: check(max_age_s=1).returncode == 1, 30, "the check to see it dead")
    assert "last heartbeat" in check(max_age_s=1).stderr
