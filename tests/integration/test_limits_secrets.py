"""Fleet-wide limits and secrets through real workers.

Limits: live sandboxes across two worker processes, creations per second, per-tenant
running tasks with fairness between tenants. Secrets: `${ENV}` and sealed inline tokens never
reach Redis, logs, results or CLI output in clear; an inline secret without keys is refused.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from producer.api import Client, TaskHandle
from sandqueue import keys
from sandqueue.contract import TaskStatus
from tests.integration.conftest import (
    RunCli,
    StartWorker,
    assert_secret_absent,
    sim_counts,
    task_events,
    task_record,
    wait_until,
)

pytestmark = pytest.mark.integration


class LiveSandboxSampler:
    """Samples SCARD sq:sim:live every 50 ms on its own thread; keeps the maximum."""

    def __init__(self, client: redis.Redis, interval_s: float = 0.05) -> None:
        self.client = client
        self.interval_s = interval_s
        self.maximum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.maximum = max(self.maximum, self.client.scard(keys.SIM_LIVE))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> LiveSandboxSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def sampler_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    yield client
    client.close()


def finished_at(rdb: redis.Redis, task_id: str) -> float:
    """When the worker published the task's result event."""
    [event] = [e for e in task_events(rdb, task_id) if e["phase"] == "result"]
    return float(event["ts"])


def run_interval(rdb: redis.Redis, task_id: str) -> tuple[float, float]:
    """(started, result) event times of the delivery that ran the task."""
    events = task_events(rdb, task_id)
    starts = [e["ts"] for e in events if e["phase"] == "started"]
    ends = [e["ts"] for e in events if e["phase"] == "result"]
    assert len(starts) == 1 and len(ends) == 1, events
    return starts[0], ends[0]


# -- fleet-wide limits ----------------------------------------------------------------------

def test_live_sandbox_limit_holds_across_two_worker_processes(
    api_client: Client, rdb: redis.Redis, sampler_client: redis.Redis,
    worker_factory: StartWorker,
) -> None:
    env = {"SANDQUEUE_MAX_LIVE_SANDBOXES": "2"}
    workers = [worker_factory(concurrency=10, env=env) for _ in range(2)]
    with LiveSandboxSampler(sampler_client) as sampler:
        started = time.monotonic()
        handles = [api_client.submit(f"limited {i}", envs={"SIM_LATENCY_S": "1"})
                   for i in range(10)]
        results = [h.wait(timeout=60) for h in handles]
        makespan = time.monotonic() - started
    print(f"\n10 one-second tasks, at most 2 sandboxes alive: {makespan:.2f}s, "
          f"max live observed {sampler.maximum} ({sampler.samples} samples)")
    assert [r.status for r in results] == [TaskStatus.SUCCEEDED] * 10, \
        [r.error for r in results]
    assert sampler.samples > 50
    assert sampler.maximum == 2, f"{sampler.maximum} sandboxes were alive at once"
    assert makespan >= 4.5, f"10 one-second tasks, 2 at a time, took only {makespan:.2f}s"
    assert makespan < 40, f"10 one-second tasks, 2 at a time, took {makespan:.2f}s"  # generous
    # Both processes took tasks: the limit is shared through Redis, not per process.
    ran_on = {task_record(rdb, h.id)["worker"].split("@")[0] for h in handles}
    assert ran_on == {w.name for w in workers}, ran_on
    assert sim_counts(rdb) == (0, 10, 10)


def test_creation_rate_limit_spaces_sandbox_creations(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    worker_factory(concurrency=6, env={"SANDQUEUE_MAX_CREATES_PER_S": "2"})
    handles = [api_client.submit(f"rate {i}", envs={"SIM_LATENCY_S": "0"}) for i in range(6)]
    results = [h.wait(timeout=30) for h in handles]
    assert [r.status for r in results] == [TaskStatus.SUCCEEDED] * 6
    created = sorted(e["ts"] for h in handles for e in task_events(rdb, h.id)
                     if e["phase"] == "sandbox_created")
    assert len(created) == 6
    span = created[-1] - created[0]
    print(f"\n6 sandboxes at 2 creations/s (burst 2): created over {span:.2f}s")
    # A burst of 2, then one every 0.5 s: the last is created 2 s after the first.
    assert span >= 1.8, f"6 creations at 2/s took only {span:.2f}s"
    assert span < 12, f"6 creations at 2/s took {span:.2f}s"  # generous: a loaded machine
    for a, b in zip(created, created[2:], strict=False):  # never 3 within one 0.5 s window
        assert b - a >= 0.3, created


def test_per_tenant_limit_lets_a_small_tenant_through_a_big_backlog(
    api_client: Client, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    worker_factory(concurrency=4, env={"SANDQUEUE_KEY_LIMITS": "label.tenant=1"})
    big = [api_client.submit(f"tenant A {i}", envs={"SIM_LATENCY_S": "1"},
                             labels={"tenant": "A"}) for i in range(12)]
    small = [api_client.submit(f"tenant B {i}", envs={"SIM_LATENCY_S": "1"},
                               labels={"tenant": "B"}) for i in range(2)]

    def done(handles: list[TaskHandle]) -> int:
        return sum(task_record(rdb, h.id).get("status") in {"succeeded", "failed"}
                   for h in handles)

    wait_until(lambda: done(small) == 2 and done(big) >= 6, 40,
               "tenant B's two tasks and six of tenant A's")
    b_first = min(run_interval(rdb, h.id)[0] for h in small)
    b_last = max(finished_at(rdb, h.id) for h in small)
    a_finished = sorted(finished_at(rdb, h.id) for h in big
                        if task_record(rdb, h.id).get("status") == "succeeded")
    a_before_b = sum(t < b_last for t in a_finished)
    # The rest of tenant A's backlog is not needed: cancel it, let it drain.
    api_client.cancel_many([h.id for h in big])
    results = [h.wait(timeout=60) for h in big]
    assert {r.status for r in results} <= {TaskStatus.SUCCEEDED, TaskStatus.CANCELLED}
    assert [h.wait(timeout=5).status for h in small] == [TaskStatus.SUCCEEDED] * 2
    b_queued_s = b_first - min(e["ts"] for h in small for e in task_events(rdb, h.id))
    print(f"\ntenant B's 2 tasks finished after {a_before_b} of tenant A's 12; "
          f"B's first task waited {b_queued_s:.2f}s to start")
    # At most one task of a tenant ran at any moment (started .. result of each delivery).
    for tenant in (big, small):
        # (tasks cancelled while still queued end at once, without ever starting)
        intervals = sorted(run_interval(rdb, h.id) for h in tenant
                           if any(e["phase"] == "started" for e in task_events(rdb, h.id)))
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end - 0.002, f"two tasks of one tenant overlapped: {intervals}"
    # Fairness: tenant B's tasks did not wait for tenant A's backlog.
    assert b_last < a_finished[5], (
        f"tenant B's 2 tasks finished after {a_before_b} of tenant A's (its first waited "
        f"{b_queued_s:.2f}s to start): A's backlog holds B back")


# -- secrets ----------------------------------------------------------------------------------

def test_env_and_sealed_inline_tokens_never_appear_in_clear(
    cli: RunCli, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    env_token = f"ghp_sqitenv{uuid.uuid4().hex}{uuid.uuid4().hex[:6]}"
    inline_token = f"ghp_sqitinline{uuid.uuid4().hex}{uuid.uuid4().hex[:6]}"
    code, out, err = cli("keygen")
    assert code == 0, err
    secret_keys = out.strip()
    keyed = {"SANDQUEUE_SECRET_KEYS": secret_keys}
    outputs = [out, err]

    common = ("--mcp", "githubOfficial", "--env", "SIM_LATENCY_S=3", "--env",
              "SIM_TOOL_CALLS=2", "--json")
    by_ref = "githubOfficial.githubPersonalAccessToken=${SQIT_GH_TOKEN}"
    code, out, err = cli("submit", "List my repositories", "--mcp-config", by_ref, *common,
                         env=keyed)
    outputs += [out, err]
    assert code == 0, err
    by_env = json.loads(out)["id"]
    code, out, err = cli("submit", "List my repositories",
                         "--mcp-config", f"githubOfficial.githubPersonalAccessToken={inline_token}",
                         *common, env=keyed)
    outputs += [out, err]
    assert code == 0, err
    inline = json.loads(out)["id"]

    # The worker starts once both are queued, so both run at once however slow the
    # submits were (a worker started first could finish one before the other arrives).
    worker = worker_factory(concurrency=4, env={**keyed, "SQIT_GH_TOKEN": env_token})
    # Mid-run: sandboxes alive, progress keys written, messages in the broker's unacked hash.
    wait_until(lambda: rdb.scard(keys.SIM_LIVE) == 2, 15, "both sandboxes to be created")
    for token in (env_token, inline_token):
        assert_secret_absent(rdb, token)

    for task_id in (by_env, inline):
        code, out, err = cli("result", task_id, "--wait", "--wait-timeout", "30", "--json",
                             env=keyed)
        outputs += [out, err]
        assert code == 0, err
        result = json.loads(out)
        for command in (("result", task_id), ("status", task_id, "--json"),
                        ("watch", task_id, "--json")):
            code, out, err = cli(*command, env=keyed)
            outputs += [out, err]
            assert code == 0, (command, err)
        assert result["status"] == "succeeded", result["error"]
        # The agent saw the gateway; what it says shows the server, never the token.
        assert {"name": "e2b-mcp-gateway", "status": "connected"} in result["mcp_servers"]
        assert "MCP servers: githubOfficial" in result["result"]
        assert sum(c["count"] for c in result["tool_calls"]) == 2

    for token in (env_token, inline_token):
        assert_secret_absent(rdb, token)
        leaks = [text for text in outputs if token in text]
        assert not leaks, f"a CLI output shows the token: {leaks}"
        assert token not in worker.log(), "the worker log shows the token"
    assert sim_counts(rdb) == (0, 2, 2)

    # A producer without keys refuses the inline token rather than send it in clear.
    code, out, err = cli("submit", "List my repositories",
                         "--mcp-config", f"githubOfficial.githubPersonalAccessToken={inline_token}",
                         *common)
    assert code == 2, (out, err)
    assert "SANDQUEUE_SECRET_KEYS" in err
    assert inline_token not in out + err
    assert len(list(rdb.scan_iter("sq:task:*"))) == 2  # nothing new was submitted
