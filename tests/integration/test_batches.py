"""Batches through the real CLI and workers: a thousand inputs, a crash of the batch command
and its resume, bad input files, budgets, status / results from another process and
`--retry-failed`."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.conftest import (
    INTERRUPTED,
    QUEUE,
    RunCli,
    StartWorker,
    Worker,
    assert_no_live_sandboxes,
    ctrl_c_able,
    product_env,
    sim_counts,
    wait_until,
)

pytestmark = pytest.mark.integration

SMALL_QUEUE = "sqit-batch-one"
"""Consumed by a worker running one task at a time: most of a batch stays queued."""
BATCH_TIMEOUT_S = 300.0  # a bound, not a target: the 1,000-task run takes ~20 s on a quiet machine


@pytest.fixture(scope="module")
def worker(module_worker_factory: StartWorker) -> Worker:
    return module_worker_factory(concurrency=100)


@pytest.fixture(scope="module")
def one_at_a_time(module_worker_factory: StartWorker) -> Worker:
    return module_worker_factory(concurrency=1, queue=SMALL_QUEUE)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def new_batch_id() -> str:
    return f"sqit-{uuid.uuid4().hex[:12]}"


# -- a thousand inputs ------------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
def test_a_thousand_inputs_give_one_result_line_each(cli: RunCli, rdb: redis.Redis,
                                                    tmp_path: Path) -> None:
    ids = [f"in-{i:04d}" for i in range(1000)]
    source = write_jsonl(tmp_path / "inputs.jsonl", [
        {"id": key, "prompt": f"Triage item {key}", "envs": {"SIM_LATENCY_S": "0.2"}}
        for key in ids])
    out = tmp_path / "results.jsonl"
    started = time.monotonic()
    code, stdout, err = cli("batch", "run", str(source), "--out", str(out), "--json",
                            "--no-progress", timeout=BATCH_TIMEOUT_S)
    elapsed = time.monotonic() - started
    print(f"\n1000-task batch on one worker (concurrency 100): {elapsed:.1f}s")
    assert code == 0, err[-3000:]
    summary = json.loads(stdout)
    lines = read_results(out)
    assert len(lines) == 1000
    assert sorted(line["id"] for line in lines) == ids
    assert Counter(line["status"] for line in lines) == {"succeeded": 1000}
    assert len({line["task_id"] for line in lines}) == 1000
    assert summary["total"] == 1000
    assert summary["by_status"] == {"succeeded": 1000}
    assert summary["by_error"] == {}
    assert summary["unsubmitted"] == 0
    assert summary["stopped"] is None
    assert summary["out"] == str(out)
    assert summary["cost_usd"] == pytest.approx(1000 * 0.0042, rel=1e-6)
    assert summary["duration_p50_s"] >= 0.2
    assert sim_counts(rdb) == (0, 1000, 1000)


# -- crash of the batch command, then resume ------------------------------------------------

@pytest.mark.usefixtures("one_at_a_time")
def test_batch_killed_midway_resumes_without_running_anything_twice(
    cli: RunCli, rdb: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    total = 30
    source = write_jsonl(tmp_path / "inputs.jsonl", [
        {"id": f"k{i}", "prompt": f"Item {i}", "envs": {"SIM_LATENCY_S": "0.1"}}
        for i in range(total)])
    out = tmp_path / "results.jsonl"
    argv = ("batch", "run", str(source), "--out", str(out), "--queue", SMALL_QUEUE, "--json",
            "--no-progress")
    with (tmp_path / "first.log").open("wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "producer.cli", *argv],
                                 env=product_env(redis_url), cwd=tmp_path,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: count_lines(out) >= total * 0.3 or first.poll() is not None, 60,
                   "30% of the results")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    written = count_lines(out)
    print(f"\nbatch command killed with {written}/{total} results written")
    assert first.returncode == -signal.SIGKILL, "the batch ended before it could be killed"
    assert written < total

    code, stdout, err = cli(*argv, timeout=BATCH_TIMEOUT_S)
    assert code == 0, err[-3000:]
    lines = read_results(out)
    assert sorted(line["id"] for line in lines) == sorted(f"k{i}" for i in range(total))
    assert Counter(line["status"] for line in lines) == {"succeeded": total}
    assert json.loads(stdout)["by_status"] == {"succeeded": total}
    assert sim_counts(rdb) == (0, total, total), "some input ran twice"


# -- Ctrl-C of the batch command, then resume -----------------------------------------------

@pytest.mark.usefixtures("one_at_a_time")
def test_ctrl_c_exits_130_prints_the_resume_command_and_that_command_finishes(
    rdb: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    total = 30
    # The later items are slower, so that Ctrl-C lands mid-batch even when a loaded machine
    # starves the command and it writes the first results in one burst.
    source = write_jsonl(tmp_path / "inputs.jsonl", [
        {"id": f"c{i}", "prompt": f"Item {i}",
         "envs": {"SIM_LATENCY_S": "0.1" if i < total // 3 else "0.5"}}
        for i in range(total)])
    out = tmp_path / "results.jsonl"
    # No --batch-id: the hint must name the derived one.
    argv = ["batch", "run", str(source), "--out", str(out), "--queue", SMALL_QUEUE,
            "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "producer.cli", *argv],
                             env=product_env(redis_url), cwd=tmp_path, preexec_fn=ctrl_c_able,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        wait_until(lambda: count_lines(out) >= total * 0.3 or first.poll() is not None, 60,
                   "30% of the results")
        first.send_signal(signal.SIGINT)
        stdout, stderr = (b.decode() for b in first.communicate(timeout=30))
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    print(f"\nbatch command interrupted with {count_lines(out)}/{total} results written")
    assert first.returncode in INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and stdout == "", stderr[-3000:]
    assert "interrupted" in stderr
    hint = next(line.strip() for line in stderr.splitlines()
                if line.strip().startswith("sandqueue batch run"))
    resume = shlex.split(hint)
    assert resume[resume.index("--batch-id") + 1] == rdb.keys("sq:batch:*:items")[0].decode(
        ).split(":")[2]
    assert [a for a in resume[1:] if a not in ("--batch-id", resume[-1])] == argv

    again = subprocess.run([sys.executable, "-m", "producer.cli", *resume[1:]],
                           env=product_env(redis_url), cwd=tmp_path, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=BATCH_TIMEOUT_S)
    err = again.stderr.decode()
    assert again.returncode == 0, err[-3000:]
    plan = re.search(r"resuming: (\d+) input\(s\) finished before are skipped, (\d+) in "
                     r"flight are followed, (\d+) to submit", " ".join(err.split()))
    assert plan, err
    assert sum(int(n) for n in plan.groups()) == total
    assert int(plan.group(1)) >= total * 0.3
    lines = read_results(out)
    assert sorted(line["id"] for line in lines) == sorted(f"c{i}" for i in range(total))
    assert Counter(line["status"] for line in lines) == {"succeeded": total}
    assert sim_counts(rdb) == (0, total, total), "some input ran twice"


# -- bad input --------------------------------------------------------------------------------

def test_bad_lines_are_all_reported_and_nothing_is_submitted(
    cli: RunCli, rdb: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "inputs.jsonl"
    source.write_text("\n".join([
        json.dumps({"id": "a", "prompt": "good one"}),
        '{"id": "b", "prompt": "cut short',                          # line 2: not JSON
        json.dumps({"id": "c", "prompt": "good two"}),
        json.dumps({"id": "d", "prompt": "   "}),                    # line 4: empty prompt
        json.dumps({"id": "e", "prompt": "good three"}),
        json.dumps({"id": "f", "prompt": "hi", "envs": {"1BAD": "x"}}),  # line 6: bad env name
        json.dumps({"id": "g", "prompt": "good four"}),
    ]) + "\n", encoding="utf-8")
    code, out, err = cli("batch", "run", str(source), "--out", str(tmp_path / "r.jsonl"))
    assert code == 2, (out, err)
    for line in (2, 4, 6):
        assert f"line {line}:" in err, err
    for line in (1, 3, 5, 7):
        assert f"line {line}:" not in err, err
    assert "3 invalid line(s)" in err
    assert rdb.llen(QUEUE) == 0
    assert list(rdb.scan_iter("sq:task:*")) == []
    assert list(rdb.scan_iter("sq:batch:*")) == []
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.usefixtures("worker")
def test_an_excel_csv_keeps_its_ids_and_ragged_rows_are_refused(
    cli: RunCli, rdb: redis.Redis, tmp_path: Path
) -> None:
    # Given a CSV as Excel saves it (BOM, CRLF) with a short row and a row with an unquoted comma
    source = tmp_path / "issues.csv"
    rows = ["id,number,title", "x1,1,Crash", "x2,2", "x3,3,Crash, then hang", 'x4,4,"two\nlines"']
    source.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    out = tmp_path / "r.jsonl"
    args = ("batch", "run", str(source), "--prompt-template", "{id} #{number}: {title}",
            "--out", str(out), "--no-progress")
    # When it is run, Then both ragged rows are reported by line and nothing is submitted
    code, stdout, err = cli(*args)
    assert code == 2, (stdout, err)
    assert "line 3: 2 field(s) but the header has 3" in err, err
    assert "line 4: 4 field(s) but the header has 3" in err, err
    assert "2 invalid line(s)" in err
    assert rdb.llen(QUEUE) == 0 and list(rdb.scan_iter("sq:task:*")) == []
    assert not out.exists()
    # When the rows are fixed (the BOM stays), Then results are keyed by the `id` column
    rows[2:4] = ["x2,2,Typo", 'x3,3,"Crash, then hang"']
    source.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    code, stdout, err = cli(*args, timeout=BATCH_TIMEOUT_S)
    assert code == 0, (stdout, err)
    assert sorted(r["id"] for r in read_results(out)) == ["x1", "x2", "x3", "x4"]


# -- budgets ----------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_at_a_time")
def test_max_failures_stops_the_batch_and_cancels_what_is_queued(
    cli: RunCli, rdb: redis.Redis, tmp_path: Path
) -> None:
    total = 20
    rows = [{"id": f"f{i}", "prompt": f"Item {i}",
             "envs": {"SIM_LATENCY_S": "0.3",
                      **({"SIM_FAIL": "agent:is_error"} if i % 4 else {})}}
            for i in range(total)]
    source = write_jsonl(tmp_path / "inputs.jsonl", rows)
    out = tmp_path / "results.jsonl"
    batch_id = new_batch_id()
    code, stdout, err = cli("batch", "run", str(source), "--out", str(out), "--queue",
                            SMALL_QUEUE, "--max-failures", "2", "--batch-id", batch_id,
                            "--json", "--no-progress", timeout=BATCH_TIMEOUT_S)
    assert code == 1, err[-3000:]
    summary = json.loads(stdout)
    print(f"\n--max-failures 2: {summary['by_status']}, {sim_counts(rdb)[1]} sandboxes")
    assert summary["stopped"] and "max-failures" in summary["stopped"], summary
    assert summary["by_status"].get("failed", 0) >= 3
    assert summary["by_status"].get("cancelled", 0) >= total // 2, summary
    assert summary["by_error"].get("agent_error", 0) >= 3
    created = sim_counts(rdb)[1]
    assert created < total // 2, f"{created} of {total} inputs ran after the budget was spent"
    lines = read_results(out)
    assert len(lines) == total  # every input still gets its line
    assert all(line["status"] == "cancelled" for line in lines
               if line["status"] not in {"failed", "succeeded"})
    code, stdout, err = cli("batch", "status", batch_id, "--json")
    assert code == 0, err
    assert json.loads(stdout)["status"] == "stopped"


@pytest.mark.usefixtures("worker")
def test_max_failures_message_agrees_with_the_summary(cli: RunCli, tmp_path: Path) -> None:
    """Tasks already running when the budget trips finish and fail too: the message counts
    them, as the table does."""
    total = 10  # all run at once; 3 fail fast and trip --max-failures 2, 7 fail later
    source = write_jsonl(tmp_path / "inputs.jsonl", [
        {"id": f"m{i}", "prompt": f"Item {i}",
         "envs": {"SIM_FAIL": "agent:is_error", "SIM_LATENCY_S": "0.05" if i < 3 else "3"}}
        for i in range(total)])
    code, stdout, err = cli("batch", "run", str(source), "--max-failures", "2", "--json",
                            "--no-progress", timeout=BATCH_TIMEOUT_S)
    assert code == 1, err[-3000:]
    summary = json.loads(stdout)
    by_status = summary["by_status"]
    print(f"\n{summary['stopped']} | {by_status}")
    failures = by_status.get("failed", 0) + by_status.get("timed_out", 0)
    said = re.match(r"--max-failures 2 exceeded: (\d+) task\(s\) failed \(.*\), (\d+) when "
                    r"the budget tripped and (\d+) more that were already running"
                    r"(?:; (\d+) queued task\(s\) cancelled)?$", summary["stopped"])
    assert said, summary["stopped"]
    assert int(said.group(1)) == failures == int(said.group(2)) + int(said.group(3))
    assert int(said.group(4) or 0) == by_status.get("cancelled", 0)
    assert failures + by_status.get("cancelled", 0) == total


@pytest.mark.usefixtures("one_at_a_time")
def test_max_cost_stops_the_batch_after_about_its_budget(
    cli: RunCli, rdb: redis.Redis, tmp_path: Path
) -> None:
    total = 20
    source = write_jsonl(tmp_path / "inputs.jsonl", [
        {"id": f"c{i}", "prompt": f"Item {i}",
         # 2 s a task: the overshoot allowed below (2 tasks) gives the batch 4 s to react
         "envs": {"SIM_LATENCY_S": "2", "SIM_COST_USD": "1"}} for i in range(total)])
    code, stdout, err = cli("batch", "run", str(source), "--queue", SMALL_QUEUE,
                            "--max-cost", "3", "--json", "--no-progress",
                            timeout=BATCH_TIMEOUT_S)
    assert code == 1, err[-3000:]
    summary = json.loads(stdout)
    print(f"\n--max-cost 3 at $1 a task: ${summary['cost_usd']}, {summary['by_status']}")
    assert summary["stopped"] and "max-cost" in summary["stopped"], summary
    succeeded = summary["by_status"].get("succeeded", 0)
    assert 3 <= succeeded <= 5, summary
    assert 3 <= summary["cost_usd"] <= 5, summary
    assert summary["by_status"].get("cancelled", 0) == total - succeeded
    # The worker may have started the next task before the stop reached it (it is then
    # cancelled while running, within the overshoot allowed above); each such sandbox is
    # killed, and none starts after that.
    assert succeeded <= sim_counts(rdb)[1] <= succeeded + 2
    assert_no_live_sandboxes(rdb)


# -- status, results and retry from other processes ----------------------------------------

@pytest.mark.usefixtures("worker")
def test_status_results_and_retry_failed(cli: RunCli, rdb: redis.Redis, tmp_path: Path) -> None:
    failing = {"r2", "r5", "r7"}
    keys_in_order = [f"r{i}" for i in range(10)]
    source = write_jsonl(tmp_path / "inputs.jsonl", [
        {"id": key, "prompt": f"Item {key}",
         "envs": {"SIM_LATENCY_S": "0.1", **({"SIM_FAIL": "agent:is_error"}
                                               if key in failing else {})}}
        for key in keys_in_order])
    out = tmp_path / "results.jsonl"
    batch_id = new_batch_id()
    run = ("batch", "run", str(source), "--out", str(out), "--batch-id", batch_id, "--json",
           "--no-progress")
    code, stdout, err = cli(*run, timeout=BATCH_TIMEOUT_S)
    assert code == 1, err[-3000:]  # some inputs failed
    assert json.loads(stdout)["by_status"] == {"succeeded": 7, "failed": 3}
    first = {line["id"]: line for line in read_results(out)}
    assert sim_counts(rdb)[1] == 10

    # Another process, knowing only the batch id.
    code, stdout, err = cli("batch", "status", batch_id, "--json")
    assert code == 0, err
    status = json.loads(stdout)
    assert status["batch_id"] == batch_id
    assert status["status"] == "done"
    assert status["total"] == "10"
    assert status["by_status"] == {"succeeded": 7, "failed": 3, "unsubmitted": 0}
    assert status["cost_usd"] == pytest.approx(10 * 0.0042, rel=1e-6)

    code, stdout, err = cli("batch", "results", batch_id)
    assert code == 0, err
    results = [json.loads(line) for line in stdout.splitlines()]
    assert [r["id"] for r in results] == keys_in_order  # input order, one line each
    assert {r["id"] for r in results if r["status"] == "failed"} == failing
    assert all(r["task_id"] == first[r["id"]]["task_id"] for r in results)

    code, _, err = cli("batch", "status", "no-such-batch", "--json")
    assert code == 2, err

    # Running it again submits nothing; with --retry-failed only the failed inputs run again.
    code, stdout, err = cli(*run, timeout=BATCH_TIMEOUT_S)
    assert code == 1, err[-3000:]
    assert sim_counts(rdb)[1] == 10, "a resume without --retry-failed ran something again"
    said = " ".join(err.split())
    assert "10 input(s) finished before are skipped, 0 in flight" in said, err
    assert "3 failed/cancelled input(s) keep their result: add --retry-failed" in said, err
    code, stdout, err = cli(*run, "--retry-failed", timeout=BATCH_TIMEOUT_S)
    assert code == 1, err[-3000:]  # they fail again (SIM_FAIL on every attempt)
    assert "3 failed/cancelled input(s) run again (--retry-failed)" in " ".join(err.split())
    assert sim_counts(rdb)[1] == 13, "--retry-failed ran more (or less) than the 3 failed inputs"
    second = {line["id"]: line for line in read_results(out)}
    assert sorted(second) == sorted(keys_in_order)
    assert len(read_results(out)) == 10
    rerun = {key for key in keys_in_order if second[key]["task_id"] != first[key]["task_id"]}
    assert rerun == failing
    assert json.loads(stdout)["by_status"] == {"succeeded": 7, "failed": 3}


# -- the Python API ---------------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
def test_submit_batch_api_gives_progress_results_and_resubmits_nothing(
    api_client: Any, rdb: redis.Redis
) -> None:
    """Given 30 tasks, submit_batch's handle yields every result once, reports progress, and
    submitting the same batch again runs nothing twice."""
    from producer.batch import submit_batch

    tasks: list[Any] = [{"id": f"t{i}", "prompt": f"item {i}", "envs": {"SIM_LATENCY_S": "0.1"}}
                        for i in range(30)]
    batch_id = new_batch_id()
    handle = submit_batch(tasks, batch_id=batch_id, client=api_client)
    got = dict(handle.results(timeout=60))
    assert sorted(got) == sorted(f"t{i}" for i in range(30))
    assert all(r.status.value == "succeeded" for r in got.values())
    assert handle.progress()["by_status"].get("succeeded") == 30
    again = submit_batch(tasks, batch_id=batch_id, client=api_client)
    assert dict(again.results(timeout=30)).keys() == got.keys()
    assert sim_counts(rdb)[1] == 30, "a re-submitted batch must not run anything twice"
