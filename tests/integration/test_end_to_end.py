"""End to end through a real Redis and a real worker process: the CLI and the Python API."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

from producer.api import Client
from sandqueue import keys
from sandqueue.contract import TaskStatus
from sandqueue.settings import Settings
from tests.integration.conftest import (
    RunCli,
    StartWorker,
    Worker,
    assert_secret_absent,
    secret_forms,
    sim_counts,
    wait_until_queue_drained,
)

pytestmark = pytest.mark.integration

GH_TOKEN = f"ghp_sqit{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
"""Only the worker has it; tasks refer to it as ${GH_TOKEN}."""
PROMPT_MARK = "--- prompt ---\n"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
WAIT = ("--wait-timeout", "30")


@pytest.fixture(scope="module")
def worker(module_worker_factory: StartWorker) -> Worker:
    return module_worker_factory(concurrency=20, env={"GH_TOKEN": GH_TOKEN})


@pytest.fixture
def api(redis_url: str) -> Iterator[Client]:
    client = Client(Settings(_env_file=None, redis_url=redis_url))  # type: ignore[call-arg]
    yield client
    if "celery" in client.__dict__:
        client.celery.close()
    if "redis" in client.__dict__:
        client.redis.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.02)


def echoed_prompt(result_text: str) -> str:
    assert PROMPT_MARK in result_text, result_text
    return result_text.split(PROMPT_MARK, 1)[1]


# -- submit / status / result -----------------------------------------------------------------

@pytest.mark.usefixtures("worker")
def test_submit_wait_json_returns_a_succeeded_result(cli: RunCli) -> None:
    code, out, err = cli("submit", "Say hello", "--label", "team=qa", "--wait", *WAIT, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded"
    assert result["simulated"] is True
    assert result["attempts"] == 1
    assert result["error"] is None
    assert result["sandbox_id"] and result["sandbox_id"].startswith("sim-")
    assert UUID.match(result["task_id"])
    assert result["labels"] == {"team": "qa"}
    assert echoed_prompt(result["result"]) == "Say hello"
    timings = result["timings"]
    for phase in ("queued_s", "sandbox_create_s", "agent_run_s", "total_s"):
        assert isinstance(timings[phase], float) and timings[phase] >= 0, (phase, timings)
    assert timings["agent_run_s"] >= 0.04  # SANDQUEUE_SIM_LATENCY_S=0.05 on the worker
    assert timings["total_s"] >= timings["agent_run_s"]
    assert timings["gateway_ready_s"] is None  # no MCP server asked for


@pytest.mark.usefixtures("worker")
def test_submit_without_wait_then_status_and_result(cli: RunCli) -> None:
    code, out, err = cli("submit", "Count to three")
    assert code == 0, err
    task_id = out.strip()
    assert UUID.match(task_id), out

    code, out, err = cli("result", task_id, "--wait", *WAIT, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["task_id"] == task_id
    assert result["status"] == "succeeded"
    assert echoed_prompt(result["result"]) == "Count to three"

    code, out, err = cli("status", task_id, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["id"] == task_id
    assert status["status"] == "succeeded"
    assert status["attempt"] == 1  # typed, not the record's strings
    assert status["sandbox_id"] == result["sandbox_id"]
    assert status["cancel_requested"] is False
    started_at, updated_at = (datetime.fromisoformat(status[k])
                              for k in ("started_at", "updated_at"))
    assert started_at.tzinfo is not None and updated_at >= started_at

    code, out, err = cli("status", task_id)
    assert code == 0, err
    assert out.split()[:2] == [task_id, "succeeded"]

    code, out, err = cli("result", task_id)  # human output, finished task: no wait needed
    assert code == 0, err
    assert task_id in out and "succeeded" in out


def test_status_names_the_worker_that_ran_the_task(cli: RunCli, worker: Worker) -> None:
    """`sandqueue status` shows `worker:` from the task record (keys.task documents it)."""
    code, out, err = cli("submit", "Who runs me?", "--wait", *WAIT, "--json")
    assert code == 0, err
    task_id = json.loads(out)["task_id"]
    code, out, err = cli("status", task_id, "--json")
    assert code == 0, err
    assert json.loads(out).get("worker", "").startswith(f"{worker.name}@"), out
    code, out, err = cli("status", task_id)
    assert f"worker: {worker.name}@" in out


@pytest.mark.usefixtures("worker")
def test_result_of_an_unfinished_task_exits_4(cli: RunCli, rdb: redis.Redis) -> None:
    # Sent to a queue no worker consumes, so it stays queued for the whole test.
    code, out, err = cli("submit", "Never picked up", "--queue", "sqit-nobody")
    assert code == 0, err
    task_id = out.strip()
    assert rdb.llen("sqit-nobody") == 1

    code, out, err = cli("result", task_id)
    assert code == 4, (out, err)
    assert "queued" in err

    code, out, _ = cli("result", task_id, "--json")
    assert code == 4
    assert json.loads(out) == {"id": task_id, "status": "queued", "result": None,
                               "error": "not_finished", "category": "pending",
                               "message": f"{task_id} has not finished: queued"}

    started = time.monotonic()
    code, _, err = cli("result", task_id, "--wait", "--wait-timeout", "1")
    assert code == 4, err
    # Generous: a slow machine starts Python slowly; a --wait-timeout ignored waits forever.
    assert time.monotonic() - started < 45

    # --json errors name the task that keeps running, also right after a submit.
    code, out, err = cli("submit", "Never picked up either", "--queue", "sqit-nobody",
                         "--wait", "--wait-timeout", "1", "--json")
    assert code == 4, (out, err)
    error = json.loads(out)
    assert (error["error"], error["category"]) == ("wait_timeout", "pending")
    assert UUID.match(error["id"]) and error["id"] in error["message"]
    assert rdb.llen("sqit-nobody") == 2

    code, out, err = cli("status", task_id)
    assert code == 0, err
    assert out.split()[:2] == [task_id, "queued"]


def test_unknown_task_id_exits_2(cli: RunCli) -> None:
    missing = str(uuid.uuid4())
    code, _, err = cli("result", missing)
    assert code == 2, err
    code, _, err = cli("status", missing)
    assert code == 2, err
    assert missing in err
    for command in ("status", "result", "watch", "cancel"):
        code, out, err = cli(command, missing, "--json")
        assert code == 2, (command, out, err)
        if command != "cancel":
            assert json.loads(out) == {
                "error": "unknown_task", "category": "usage", "id": missing,
                "message": f"no task {missing} is known (wrong id, or its record expired "
                           "after SANDQUEUE_RESULT_EXPIRES_S)"}
        assert "Traceback" not in err
    code, out, err = cli("cancel", missing, "--json")
    assert json.loads(out) == {"tasks": [{"id": missing, "outcome": "unknown",
                                          "status": "unknown"}]}
    for command in ("status", "result", "watch"):  # an empty id reached Celery and crashed
        code, out, err = cli(command, "")
        assert code == 2 and "task id is empty" in err and "Traceback" not in err, err


# -- the prompt arrives byte for byte --------------------------------------------------------

def hostile_prompt(marker: Path) -> str:
    return (
        "  It's a \"double\" and 'single' quote test.\n"
        f"$(touch {marker}) and `touch {marker}`; rm -rf {marker.parent} ; echo pwned\n"
        "back\\slash \\n \\\\ \\' \\\" %s {} ${HOME} !! \x1b[31mred\x1b[0m\n"
        "\ttab\tseparated\t\n"
        "naïve — 日本語 🚀 Ünïcödé\u200b zero-width\n"
        "--- prompt ---\n"
        "trailing blank lines follow\n\n"
    )


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("how", ["stdin", "file", "argument"])
def test_prompt_arrives_byte_exact(cli: RunCli, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    prompt = hostile_prompt(marker)
    if how == "stdin":
        code, out, err = cli("submit", "-", "--wait", *WAIT, "--json", stdin=prompt)
    elif how == "file":
        path = tmp_path / "prompt.txt"
        path.write_bytes(prompt.encode("utf-8"))
        code, out, err = cli("submit", f"@{path}", "--wait", *WAIT, "--json")
    else:
        code, out, err = cli("submit", prompt, "--wait", *WAIT, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded"
    text = result["result"]
    assert f"received {len(prompt.encode('utf-8'))} bytes" in text
    assert echoed_prompt(text) == prompt
    assert not marker.exists(), "something ran the prompt through a shell"


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("how", ["stdin", "file"])
def test_prompt_line_endings_are_kept(cli: RunCli, tmp_path: Path, how: str) -> None:
    """CRLF and lone CR are part of the prompt too: `submit -` and `@file` must not
    translate them (text-mode reads turn them into \\n)."""
    prompt = "line one\r\nline two\rline three\n"
    if how == "stdin":
        code, out, err = cli("submit", "-", "--wait", *WAIT, "--json", stdin=prompt.encode())
    else:
        path = tmp_path / "crlf.txt"
        path.write_bytes(prompt.encode())
        code, out, err = cli("submit", f"@{path}", "--wait", *WAIT, "--json")
    assert code == 0, err
    assert echoed_prompt(json.loads(out)["result"]) == prompt


# -- MCP: the token stays on the worker ------------------------------------------------------

def test_secret_scan_finds_a_planted_token(rdb: redis.Redis) -> None:
    """The scan used below must be able to fail: plant the token in each type and encoding."""
    token = f"ghp_planted{uuid.uuid4().hex}"
    plants: list[Callable[[], object]] = [
        lambda: rdb.set("plant:str", f"prefix {token} suffix"),
        lambda: rdb.hset("plant:hash", "field", json.dumps({"x": token})),
        lambda: rdb.hset("plant:hash2", token, "value-in-field-name"),
        lambda: rdb.rpush("plant:list", b"a", base64.b64encode(b"xy" + token.encode())),
        lambda: rdb.sadd("plant:set", base64.b64encode(b"z" + token.encode() + b"!")),
        lambda: rdb.zadd("plant:zset", {token: 1.0}),
        lambda: rdb.xadd("plant:stream", {"data": token}),
        lambda: rdb.set(f"plant:{token}", "in the key name"),
    ]
    rdb.set("plant:clean", "nothing here")
    assert_secret_absent(rdb, token)
    for plant in plants:
        plant()
        with pytest.raises(AssertionError, match="plant:"):
            assert_secret_absent(rdb, token)
        for key in rdb.scan_iter("plant:*"):
            if key != b"plant:clean":
                rdb.delete(key)
    assert len(secret_forms(token)) == 4


def test_mcp_token_is_resolved_on_the_worker_and_never_stored(
    cli: RunCli, rdb: redis.Redis, worker: Worker
) -> None:
    args = ("submit", "List my repositories", "--mcp", "githubOfficial",
            "--mcp-config", "githubOfficial.githubPersonalAccessToken=${GH_TOKEN}",
            "--env", "SIM_LATENCY_S=1.5", "--env", "SIM_TOOL_CALLS=2")
    code, out, err = cli(*args, "--json")  # the CLI's environment has no GH_TOKEN
    assert code == 0, err
    task_id = json.loads(out)["id"]
    outputs = [out, err]

    # Mid-run, with the sandbox alive and every progress key written, and again at the end.
    wait_until(lambda: rdb.scard(keys.SIM_LIVE) == 1, what="the sandbox to be created")
    assert_secret_absent(rdb, GH_TOKEN)

    code, out, err = cli("result", task_id, "--wait", *WAIT, "--json")
    outputs += [out, err]
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded", result["error"]
    assert {"name": "e2b-mcp-gateway", "status": "connected"} in result["mcp_servers"]
    assert result["timings"]["gateway_ready_s"] is not None
    assert {"name": "mcp__e2b-mcp-gateway__githubOfficial_search", "count": 2} in \
        result["tool_calls"]
    assert "MCP servers: githubOfficial" in result["result"]

    code, out, err = cli("status", task_id, "--json")
    outputs += [out, err]
    code, out, err = cli("result", task_id)
    outputs += [out, err]
    assert code == 0, err

    assert_secret_absent(rdb, GH_TOKEN)
    for text in outputs:
        assert GH_TOKEN not in text
    assert GH_TOKEN not in worker.log()


# -- the Python API: concurrency and idempotency ---------------------------------------------

def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals that overlap at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # at a tie, an end (-1) sorts before a start: touching is not overlap
        running += step
        peak = max(peak, running)
    return peak


def test_twenty_tasks_run_in_parallel_on_one_worker(api: Client, worker: Worker) -> None:
    handles = [api.submit(f"parallel task {i}", envs={"SIM_LATENCY_S": "2"}) for i in range(20)]
    results = [h.wait(timeout=60) for h in handles]

    assert [r.status for r in results] == [TaskStatus.SUCCEEDED] * 20
    assert [echoed_prompt(r.result or "") for r in results] == \
        [f"parallel task {i}" for i in range(20)]
    assert all((r.timings.agent_run_s or 0) >= 1.95 for r in results)
    assert len({r.sandbox_id for r in results}) == 20
    assert None not in {r.sandbox_id for r in results}
    # The threads pool runs them together: judged by when each ran, not by a wall-clock bound
    # (one after another, no two would overlap; a slow machine slows them all alike).
    spans = [(r.finished_at - (r.timings.total_s or 0), r.finished_at) for r in results]
    assert most_at_once(spans) >= 10, f"at most {most_at_once(spans)} of 20 ran at once"
    log = worker.log()  # the only worker consuming the queue ran all of them
    assert all(f"task {h.id} succeeded" in log for h in handles)


def test_idempotency_key_runs_the_task_once(api: Client, cli: RunCli, rdb: redis.Redis,
                                            worker: Worker) -> None:
    key = f"sqit-{uuid.uuid4().hex}"
    first = api.submit("Do it once", idempotency_key=key)
    second = api.submit("Do it once", idempotency_key=key)
    assert second.id == first.id
    assert first.duplicate is False
    assert second.duplicate is True

    code, out, err = cli("submit", "Do it once", "--idempotency-key", key, "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": first.id, "duplicate": True}

    result = first.wait(timeout=30)
    assert result.status is TaskStatus.SUCCEEDED
    assert second.wait(timeout=5).sandbox_id == result.sandbox_id
    # Had a second copy been enqueued, it is delivered before the sentinel: it would have run
    # (a second sandbox) or been logged as a duplicate delivery.
    wait_until_queue_drained(api, rdb)
    assert f"task {first.id}: duplicate delivery ignored" not in worker.log()
    assert sim_counts(rdb)[1] == 2, "one sandbox for the task, one for the sentinel"
