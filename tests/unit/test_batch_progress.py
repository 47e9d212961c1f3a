"""What `batch run` tells its user: the progress line, the resume plan and command, and the
stop message of a budget. Redis is fakeredis; nothing is submitted."""

from __future__ import annotations

import io
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
from rich.console import Console

from producer import render
from producer.api import Client
from producer.batch import Batch, BatchInput, BatchRunner, Progress, batch_key
from producer.cli import batch_run, resume_command
from sandqueue import keys
from sandqueue.contract import AgentTask
from sandqueue.settings import Settings


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(Client, "redis", property(lambda self: fake))
    yield Client(Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0"))  # type: ignore[call-arg]
    fake.close()


def _inputs(n: int) -> list[BatchInput]:
    return [BatchInput(f"k{i}", i + 1, AgentTask(prompt=f"item {i}")) for i in range(n)]


# -- the progress line ------------------------------------------------------------------------

def test_no_progress_prints_nothing_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=sink, force_terminal=False))
    p = Progress(total=10)
    p.by_status["succeeded"] = 5
    with render.BatchProgress(10, enabled=False) as bar:
        bar.update(p)
        bar._last_line = 0.0  # a line would be due now
        bar.update(p)
    assert sink.getvalue() == ""


def test_without_a_terminal_progress_is_a_line_now_and_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sink = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=sink, force_terminal=False))
    p = Progress(total=10)
    p.unknown = 2
    with render.BatchProgress(10, enabled=True) as bar:
        bar.update(p)
    assert "0/10" in sink.getvalue() and "2 unknown" in sink.getvalue()


def test_rate_counts_only_this_runs_work() -> None:
    p = Progress(total=100, baseline=90)
    p.started = 1000.0
    p.by_status["succeeded"] = 95  # 90 finished before this run, 5 by it
    assert p.rate(now=1010.0) == pytest.approx(0.5)
    p.by_status["succeeded"] = 40  # before the earlier results are counted: never negative
    assert p.rate(now=1010.0) == 0


def test_unknown_tasks_are_not_counted_as_queued(client: Client) -> None:
    runner = BatchRunner(Batch(client, "b"), _inputs(4), out=None)
    runner._tally_open({"t1": ("unknown", 0.0), "t2": ("queued", 0.0),
                        "t3": ("running", 0.0), "t4": ("submitting", 0.0)},
                       {"t1": "k0", "t2": "k1", "t3": "k2", "t4": "k3"})
    p = runner.progress
    assert (p.unknown, p.queued, p.running) == (1, 2, 1)
    assert p.summary("b", None)["unsubmitted"] == 0


# -- resume -----------------------------------------------------------------------------------

def test_resume_plan_says_what_is_skipped_followed_and_kept(client: Client) -> None:
    r = client.redis
    batch = Batch(client, "b")
    r.hset(batch_key("b"), mapping={"total": 5, "created_at": time.time()})
    r.hset(batch_key("b", "items"), mapping={"k0": "t0", "k1": "t1", "k2": "t2", "k3": "t3"})
    for task_id, status in (("t0", "succeeded"), ("t1", "failed"), ("t2", "running"),
                            ("t3", "cancelled")):
        r.hset(keys.task(task_id), "status", status)
    runner = BatchRunner(batch, _inputs(5), out=None)
    pending = runner._resume({})
    plan = runner.plan
    assert (plan.finished, plan.in_flight, plan.not_retried, plan.retried) == (3, 1, 2, 0)
    assert set(pending) == {"t0", "t1", "t2", "t3"}  # results are collected, nothing resent

    retrying = BatchRunner(batch, _inputs(5), out=None, retry_failed=True)
    pending = retrying._resume({})
    assert (retrying.plan.finished, retrying.plan.retried) == (1, 2)
    assert set(pending) == {"t0", "t2"}


def test_resume_command_repeats_the_arguments_with_the_batch_id(tmp_path: Path) -> None:
    source = tmp_path / "my inputs.jsonl"
    source.write_text('{"prompt": "x"}\n', encoding="utf-8")
    args = [str(source), "--out", "r.jsonl", "--mcp", "notion", "--mcp", "jetbrains",
            "--env", "A=1 2", "--max-failures", "3", "--no-progress", "--model", "m"]
    ctx = batch_run.make_context("run", args)
    command = resume_command(ctx, "b-123")
    argv = shlex.split(command)
    assert argv[:4] == ["sandqueue", "batch", "run", str(source)]
    assert argv[-2:] == ["--batch-id", "b-123"]
    for pair in (["--out", "r.jsonl"], ["--mcp", "notion"], ["--mcp", "jetbrains"],
                 ["--env", "A=1 2"], ["--max-failures", "3"], ["--model", "m"]):
        assert any(argv[i:i + 2] == pair for i in range(len(argv))), (pair, argv)
    assert "--no-progress" in argv and "--retry-failed" not in argv and "--json" not in argv
    reparsed = batch_run.make_context("run", argv[3:])
    assert reparsed.params == {**ctx.params, "batch_id": "b-123"}


# -- budgets ----------------------------------------------------------------------------------

def test_max_failures_message_counts_late_failures_like_the_table(client: Client) -> None:
    runner = BatchRunner(Batch(client, "b"), _inputs(10), out=None, max_failures=2)
    p = runner.progress
    p.by_status["failed"] = 3
    assert runner._over_budget()
    assert p.stopped == "3 failures exceeded --max-failures 2"
    # Tasks already running when it tripped end after it: one more failure, one time-out;
    # cancelled tasks (the batch's own doing) are not failures.
    p.by_status.update({"failed": 1, "timed_out": 1, "cancelled": 4})
    runner._cancelled_by_stop = 4
    message = runner._stop_message()
    assert message.startswith("--max-failures 2 exceeded: 5 task(s) failed (failed 4, "
                              "timed_out 1), 3 when the budget tripped and 2 more")
    assert message.endswith("; 4 queued task(s) cancelled")
