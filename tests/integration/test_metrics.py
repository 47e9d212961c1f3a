"""`/metrics` after a handful of real tasks: a real `sandqueue serve`, a real worker process
with its metrics port, sim sandboxes. Successes, a failure retried into a success, a
failure that is not retried, a cancellation and a webhook that needs two tries; then the
counters and histograms of both processes say exactly that."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from sandqueue.localredis import free_port
from tests.integration.conftest import StartWorker, task_events, wait_until
from tests.integration.http_server import ApiServer, serve_fixture
from tests.integration.test_http_webhooks import ALLOW, Receiver, key_with_secret

TOKEN = "scrape-me-0123456789"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory,
                             env={**ALLOW, "SANDQUEUE_METRICS_TOKEN": TOKEN})


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def submit(c: httpx.Client, body: dict[str, Any]) -> str:
    answer = c.post("/v1/tasks", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def result(c: httpx.Client, task_id: str) -> dict[str, Any]:
    got: dict[str, Any] = c.get(f"/v1/tasks/{task_id}/result", params={"wait": 55},
                                timeout=120).json()
    return got


def test_counters_and_histograms_move_with_the_tasks(
        server: ApiServer, worker_factory: StartWorker, redis_url: str,
        rdb: redis.Redis) -> None:
    port = free_port()
    worker_factory(concurrency=4, env={**ALLOW, "SANDQUEUE_METRICS_PORT": str(port)})
    worker_url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(worker_url)
    assert value(before, "sandqueue_tasks_in_flight") == 0
    receiver = Receiver(failures=1)
    try:
        with server.client(key_with_secret(redis_url)["key"]) as c:
            ids = [submit(c, {"prompt": "fine", "envs": {"SIM_COST_USD": "0.25"}}),
                   submit(c, {"prompt": "call back", "callback_url": receiver.url}),
                   submit(c, {"prompt": "flaky", "envs": {"SIM_FAIL": "agent:overloaded:1"}}),
                   submit(c, {"prompt": "no key", "envs": {"SIM_FAIL": "agent:auth"}})]
            long = submit(c, {"prompt": "long", "envs": {"SIM_LATENCY_S": "60"}})
            # its agent runs (so the cancellation ends an attempt whose agent ran)
            wait_until(lambda: "agent_started" in [e["phase"] for e in task_events(rdb, long)],
                       30, "the long task's agent to start")
            running = scrape(worker_url)
            assert value(running, "sandqueue_tasks_in_flight") >= 1
            assert c.post(f"/v1/tasks/{long}/cancel").status_code == 202
            results = [result(c, t) for t in [*ids, long]]
        wait_until(lambda: [code for _, _, code in receiver.requests] == [500, 200], 60,
                   lambda: f"the webhook's two tries, got {receiver.requests}")
    finally:
        receiver.close()
    assert [r["status"] for r in results] == ["succeeded", "succeeded", "succeeded", "failed",
                                               "cancelled"]
    assert results[2]["attempts"] == 2 and results[3]["error"]["category"] == "auth"
    check_worker(wait_until(lambda: _webhook_done(worker_url), 30, "the webhook counter"),
                 results)
    check_serve(server)


def _webhook_done(url: str) -> Samples | None:
    samples = scrape(url)
    return samples if value(samples, "sandqueue_webhook_deliveries_total",
                            outcome="delivered") == 1 else None


def check_worker(after: Samples, results: list[dict[str, Any]]) -> None:
    finished = "sandqueue_tasks_finished_total"
    assert value(after, finished, status="succeeded", error="") == 3
    assert value(after, finished, status="failed", error="auth") == 1
    assert value(after, finished, status="cancelled", error="cancelled") == 1
    # the flaky task's first attempt: a model error, retried
    assert value(after, "sandqueue_attempts_total", outcome="model_unavailable",
                 retried="true") == 1
    assert value(after, "sandqueue_attempts_total", outcome="succeeded", retried="false") == 3
    attempts = sum(r["attempts"] for r in results)
    assert attempts == 6
    assert value(after, "sandqueue_sandbox_creations_total") == attempts
    count = "sandqueue_phase_seconds_count"
    assert value(after, count, phase="sandbox_create") == attempts
    assert value(after, count, phase="agent_run") == attempts  # the agent ran in each
    assert value(after, count, phase="queued") == len(results)
    assert value(after, count, phase="total") == len(results)
    assert value(after, "sandqueue_phase_seconds_bucket", phase="agent_run", le="+Inf") == 6
    # a 60 s sandbox cancelled early still ran for a while, more than the quick ones
    assert value(after, "sandqueue_phase_seconds_sum", phase="agent_run") > 0
    cost = sum(r["total_cost_usd"] or 0 for r in results)
    assert value(after, "sandqueue_cost_usd_total", tenant="acme") == pytest.approx(cost)
    assert cost >= 0.25
    tokens = sum(r["usage"].get("output_tokens", 0) for r in results)
    assert value(after, "sandqueue_tokens_total", tenant="acme", kind="output") == tokens > 0
    assert value(after, "sandqueue_webhook_deliveries_total", outcome="retry") == 1
    assert value(after, "sandqueue_tasks_in_flight") == 0


def check_serve(server: ApiServer) -> None:
    url = f"{server.url}/metrics"
    refused = httpx.get(url, timeout=30)
    assert refused.status_code == 401 and "SANDQUEUE_METRICS_TOKEN" in refused.text
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code \
        == 401
    samples = scrape(url, TOKEN)
    assert value(samples, "sandqueue_tasks_submitted_total", tenant="acme") == 5
    assert value(samples, "sandqueue_fleet_up") == 1
    assert value(samples, "sandqueue_fleet_workers") == 1
    assert value(samples, "sandqueue_queue_depth", queue="sandqueue") == 0
    assert value(samples, "sandqueue_fleet_running_tasks") == 0
    assert value(samples, "sandqueue_sandbox_creations_per_second") > 0
    assert value(samples, "sandqueue_tenant_running", tenant="acme") == 0
