"""An interrupted submit strands nothing (issue: `batch run` of 5,000 lines interrupted with
SIGINT while submitting, then resumed, showed `1000 queued` forever: their keys were bound
to tasks never recorded nor published). Real `batch run` processes, a real worker and
redis-server."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis

from producer.api import Client
from sandqueue import keys
from sandqueue.contract import TaskStatus
from tests.integration.conftest import (
    INTERRUPTED,
    RunCli,
    StartWorker,
    close_client,
    ctrl_c_able,
    make_client,
    product_env,
    sim_counts,
)

pytestmark = pytest.mark.integration

TOTAL = 3000
"""Three chunks of 1,000: the interrupt lands while the first chunks are being sent."""


def idem_key(batch_id: str, input_key: str) -> str:
    """The idempotency key `batch run` gives an input (producer/batch.py `Batch._idem`)."""
    digest = hashlib.sha256(input_key.encode()).hexdigest()[:24]
    return keys.idempotency(f"batch:{batch_id}:{digest}:0")


def write_inputs(path: Path, total: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"k{i}", "prompt": f"Item {i}",
                                        "envs": {"SIM_LATENCY_S": "0"}}) + "\n"
                            for i in range(total)), encoding="utf-8")
    return path


def stranded(rdb: redis.Redis) -> int:
    return sum(1 for k in rdb.scan_iter(match=keys.task("*"), count=1000)
               if rdb.hget(k, "status") == TaskStatus.SUBMITTING.value.encode())


def test_batch_interrupted_while_submitting_resumes_with_every_result_once(
        cli: RunCli, rdb: redis.Redis, redis_url: str, tmp_path: Path,
        worker_factory: StartWorker) -> None:
    # Given a batch command interrupted with SIGINT as soon as its first chunk is claimed
    # (no worker yet: what it left behind stays as it was left)
    queue = f"sqit-int-{uuid.uuid4().hex[:6]}"
    batch_id = f"int-{uuid.uuid4().hex[:8]}"
    source = write_inputs(tmp_path / "inputs.jsonl", TOTAL)
    out = tmp_path / "results.jsonl"
    argv = ("batch", "run", str(source), "--out", str(out), "--queue", queue, "--batch-id",
            batch_id, "--json", "--no-progress")
    first_key = idem_key(batch_id, "k0")
    # A command that does not exit after the interrupt is made to dump its threads' stacks
    # (SIGABRT under faulthandler) into its log, which the failure shows.
    env = {**product_env(redis_url), "PYTHONFAULTHANDLER": "1"}
    log_path = tmp_path / "first.log"
    with log_path.open("wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "producer.cli", *argv],
                                 env=env, cwd=tmp_path, preexec_fn=ctrl_c_able,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            end = time.monotonic() + 60
            while not rdb.exists(first_key) and first.poll() is None:
                assert time.monotonic() < end, "the batch never started submitting"
                time.sleep(0.002)  # not a busy loop: on two cores it starves the command
            first.send_signal(signal.SIGINT)
            first.wait(60)
        except subprocess.TimeoutExpired:
            first.send_signal(signal.SIGABRT)
            first.wait(10)
            pytest.fail("the batch command did not exit within 60 s of Ctrl-C:\n"
                        + log_path.read_text(errors="replace")[-8000:])
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(10)
    assert first.returncode in INTERRUPTED, "the batch finished before it could be interrupted"
    left = stranded(rdb)
    print(f"\ninterrupted: {rdb.llen(queue)} messages queued, {left} tasks left submitting")

    # When it is run again, with a worker
    worker_factory(concurrency=50, queue=queue)
    code, stdout, err = cli(*argv, timeout=180)

    # Then every input has exactly one result, all succeeded, and none ran twice
    assert code == 0, err[-3000:]
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert Counter(line["id"] for line in lines) == {f"k{i}": 1 for i in range(TOTAL)}
    assert Counter(line["status"] for line in lines) == {"succeeded": TOTAL}
    assert sim_counts(rdb)[1] == TOTAL, "some input ran twice (or not at all)"
    assert stranded(rdb) == 0
    code, stdout, _ = cli("batch", "status", batch_id, "--json")
    assert json.loads(stdout)["by_status"].get("succeeded") == TOTAL


def test_tasks_a_dead_producer_recorded_but_never_sent_run_on_resume(
        cli: RunCli, rdb: redis.Redis, redis_url: str, tmp_path: Path,
        worker_factory: StartWorker) -> None:
    # Given the exact state a producer leaves when it dies between claiming a chunk and
    # publishing it: keys bound, tasks recorded `submitting`, no message on the queue
    queue = f"sqit-int-{uuid.uuid4().hex[:6]}"
    batch_id = f"dead-{uuid.uuid4().hex[:8]}"
    source = write_inputs(tmp_path / "inputs.jsonl", 20)
    out = tmp_path / "results.jsonl"
    argv = ("batch", "run", str(source), "--out", str(out), "--queue", queue, "--batch-id",
            batch_id, "--json", "--no-progress")
    client = make_client(redis_url)
    try:
        _die_before_publishing(client, source, batch_id, queue)
        assert stranded(rdb) == 20 and rdb.llen(queue) == 0

        # When the batch is resumed with a worker
        worker_factory(concurrency=10, queue=queue)
        code, stdout, err = cli(*argv, timeout=120)
    finally:
        close_client(client)

    # Then all 20 ran once each, under the task ids first recorded
    assert code == 0, err[-3000:]
    assert json.loads(stdout)["by_status"] == {"succeeded": 20}
    assert sim_counts(rdb)[1] == 20
    assert stranded(rdb) == 0


def _die_before_publishing(client: Client, source: Path, batch_id: str, queue: str) -> None:
    """Run `batch run`'s submit path up to the publish, then stop, as a kill -9 would."""
    from producer.batch import Batch, load_inputs

    class Died(BaseException):
        pass

    def die(messages: list[object]) -> None:
        if messages:
            raise Died()

    inputs = load_inputs(source, prepare=client.prepare, defaults={})
    batch = Batch(client, batch_id)
    batch.register(inputs, str(source))
    client._publish = die  # type: ignore[method-assign]
    with pytest.raises(Died):
        batch.submit(inputs, queue=queue)


def test_a_single_submit_interrupted_before_publishing_runs_on_the_next_submit(
        cli: RunCli, rdb: redis.Redis, redis_url: str, worker_factory: StartWorker) -> None:
    # Given `submit(..., idempotency_key=K)` that died between claiming K and publishing
    queue = f"sqit-int-{uuid.uuid4().hex[:6]}"
    client = make_client(redis_url)
    try:
        def die(messages: list[object]) -> None:
            raise KeyboardInterrupt

        client._publish = die  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            client.submit("summarise", idempotency_key="once-only", queue=queue)
    finally:
        close_client(client)
    assert stranded(rdb) == 1
    worker_factory(concurrency=2, queue=queue)

    # When the same task is submitted again with K, and waited for
    code, stdout, err = cli("submit", "summarise", "--idempotency-key", "once-only", "--queue",
                            queue, "--wait", "--wait-timeout", "60", "--json")

    # Then it is the first task, it runs once, and succeeds
    assert code == 0, err
    result = json.loads(stdout)
    assert result["status"] == "succeeded"
    assert rdb.get(keys.idempotency("once-only")).decode() == result["task_id"]
    assert sim_counts(rdb)[1] == 1


def test_a_task_cancelled_on_a_queue_nobody_serves_ends_at_once(
        rdb: redis.Redis, redis_url: str, worker_factory: StartWorker) -> None:
    # Given a task queued where no worker listens
    queue = f"sqit-idle-{uuid.uuid4().hex[:6]}"
    client = make_client(redis_url)
    try:
        handle = client.submit("never runs", queue=queue)

        # When it is cancelled
        assert client.cancel_outcomes([handle.id]) == {handle.id: ("cancelled", None)}

        # Then it is cancelled now, with a result, not "queued / cancel requested"
        assert handle.status() is TaskStatus.CANCELLED
        result = handle.wait(timeout=10)
        assert result.status is TaskStatus.CANCELLED
        assert result.error is not None and result.error.category.value == "cancelled"

        # And a worker that later receives its message drops it without a sandbox
        worker = worker_factory(concurrency=2, queue=queue)
        end = time.monotonic() + 30
        while rdb.llen(queue) or f"task {handle.id}" not in worker.log():
            assert time.monotonic() < end, "the worker never took the message"
            time.sleep(0.1)
        assert sim_counts(rdb)[1] == 0
        assert handle.wait(timeout=5).status is TaskStatus.CANCELLED
    finally:
        close_client(client)
