"""Failures through real workers: retries, permanent errors, deadlines, stalls, exit codes."""

from __future__ import annotations

import json
import time

import pytest
import redis

from sandqueue.localredis import free_port
from tests.integration.conftest import QUEUE, RunCli, StartWorker, Worker, sim_counts

pytestmark = pytest.mark.integration

WAIT = ("--wait", "--wait-timeout", "30", "--json")


@pytest.fixture(scope="module")
def worker(module_worker_factory: StartWorker) -> Worker:
    """Stall timeout 2 s, backoff off; no GH_TOKEN or other secrets in its environment."""
    return module_worker_factory(concurrency=4)


def submit_json(cli: RunCli, *args: str) -> tuple[int, dict, str]:
    code, out, err = cli("submit", *args, *WAIT)
    assert out.strip(), f"no JSON on stdout (exit {code}): {err}"
    return code, json.loads(out), err


# -- retries and permanent errors --------------------------------------------------------------

def test_transient_create_failures_are_retried(cli: RunCli, rdb: redis.Redis,
                                               worker: Worker) -> None:
    code, result, err = submit_json(cli, "Retry me", "--env", "SIM_FAIL=create:rate_limit:2")
    assert code == 0, err
    assert result["status"] == "succeeded", result["error"]
    assert result["attempts"] == 3
    assert result["error"] is None
    assert sim_counts(rdb) == (0, 1, 1)  # the two refused creates made no sandbox
    record = {k.decode(): v.decode() for k, v in rdb.hgetall(f"sq:task:{result['task_id']}")
              .items()}
    assert record["status"] == "succeeded"
    assert record["attempt"] == "3"
    assert "retried" in worker.log() or "retrying" in worker.log()


@pytest.mark.usefixtures("worker")
def test_auth_failure_is_not_retried_and_exits_1(cli: RunCli, rdb: redis.Redis) -> None:
    code, result, _ = submit_json(cli, "No key", "--env", "SIM_FAIL=create:auth")
    assert code == 1
    assert result["status"] == "failed"
    assert result["attempts"] == 1
    assert result["error"]["category"] == "auth"
    assert result["error"]["retryable"] is False
    assert "E2B_API_KEY" in result["error"]["message"]
    assert sim_counts(rdb) == (0, 0, 0)


@pytest.mark.usefixtures("worker")
def test_agent_error_exits_1_in_human_output(cli: RunCli) -> None:
    code, out, err = cli("submit", "Fail please", "--env", "SIM_FAIL=agent:is_error",
                         "--wait", "--wait-timeout", "30")
    assert code == 1, (out, err)
    assert "failed" in out
    assert "agent_error" in out


@pytest.mark.usefixtures("worker")
def test_agent_hang_ends_as_agent_stalled(cli: RunCli, rdb: redis.Redis) -> None:
    # No wall-clock bound: the category says the stall detector (2 s) ended both attempts,
    # not the task's deadline, and the CLI waits 30 s at most.
    code, result, _ = submit_json(cli, "Hang", "--env", "SIM_FAIL=agent:hang",
                                  "--max-attempts", "2")
    assert code == 1
    assert result["status"] == "failed"
    assert result["error"]["category"] == "agent_stalled"
    assert result["attempts"] == 2  # a stall is retryable: a fresh sandbox, then it gave up
    assert sim_counts(rdb) == (0, 2, 2)  # both hung sandboxes were killed


@pytest.mark.usefixtures("worker")
def test_unresolvable_env_reference_fails_as_mcp_config(cli: RunCli, rdb: redis.Redis) -> None:
    code, result, _ = submit_json(
        cli, "Needs a token", "--mcp", "githubOfficial",
        "--mcp-config", "githubOfficial.githubPersonalAccessToken=${SQIT_NOT_SET_ON_WORKER}",
    )
    assert code == 1
    assert result["status"] == "failed"
    assert result["error"]["category"] == "mcp_config"
    assert "SQIT_NOT_SET_ON_WORKER" in result["error"]["message"]
    assert sim_counts(rdb) == (0, 0, 0)


def test_deadline_stops_a_long_agent(cli: RunCli, rdb: redis.Redis,
                                     worker_factory: StartWorker) -> None:
    # A stall timeout far above the deadline, so only the deadline can stop the agent; its
    # own queue, so the module's worker (stall timeout 2 s) cannot take the task.
    worker_factory(concurrency=2, queue="sqit-slow", env={"SANDQUEUE_STALL_TIMEOUT_S": "120"})
    code, result, err = submit_json(cli, "Take your time", "--timeout", "2", "--queue",
                                    "sqit-slow", "--env", "SIM_LATENCY_S=30")
    assert code == 1, err
    assert result["status"] == "timed_out"
    assert result["error"]["category"] == "timeout"
    assert result["attempts"] == 1
    # Not before the deadline; long before the agent's 30 s (generous: a loaded machine).
    assert 1.5 <= result["timings"]["total_s"] < 15, result["timings"]
    assert sim_counts(rdb) == (0, 1, 1)  # killed, not left to run its 30 s


# -- exit codes without a task run -------------------------------------------------------------

@pytest.mark.parametrize(("args", "stdin", "named"), [
    (("Hi", "--mcp", "githubb"), None, "githubOfficial"),
    (("Hi", "--mcp", "githubOfficial"), None, "githubPersonalAccessToken"),
    (("Hi", "--env", "ANTHROPIC_API_KEY=sk-mine"), None, "ANTHROPIC_API_KEY"),
    (("Hi", "--timeout", "999999"), None, "timeout"),
    (("Hi", "--mcp-config", "nodot"), None, "NAME.key=value"),
    (("-",), " \n\t ", "empty"),
])
def test_invalid_task_exits_2_and_enqueues_nothing(
    cli: RunCli, rdb: redis.Redis, args: tuple[str, ...], stdin: str | None, named: str
) -> None:
    code, out, err = cli("submit", *args, "--wait", "--wait-timeout", "5", stdin=stdin)
    assert code == 2, (out, err)
    assert named in err
    assert rdb.llen(QUEUE) == 0
    assert list(rdb.scan_iter("sq:task:*")) == []
    # Workers' own bookkeeping (exchange bindings, maintenance locks, advertised limits)
    # is not the submit's.
    leftovers = [k for k in rdb.scan_iter()
                 if not k.startswith((b"_kombu.binding.", b"sq:lock:", b"sq:workers:"))]
    assert leftovers == []


@pytest.mark.parametrize("command", [
    ("submit", "Hello"),
    ("submit", "Hello", "--wait"),
    ("submit", "Hello", "--idempotency-key", "k1"),
    ("status", "00000000-0000-0000-0000-000000000000"),
    ("result", "00000000-0000-0000-0000-000000000000"),
    ("result", "00000000-0000-0000-0000-000000000000", "--wait"),
])
def test_redis_unreachable_exits_3_quickly(cli: RunCli, command: tuple[str, ...]) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    code, out, err = cli(*command, env={"REDIS_URL": nowhere}, timeout=30)
    elapsed = time.monotonic() - started
    assert code == 3, (out, err)
    assert "cannot reach Redis" in err
    # Generous for a loaded machine; retries with backoff (minutes) would still fail it.
    assert elapsed < 20, f"took {elapsed:.1f}s to report an unreachable Redis"
