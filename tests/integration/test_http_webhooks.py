"""Completion webhooks end to end: a task submitted over HTTP with a `callback_url` is
POSTed, signed with its API key's webhook secret, by the real worker's dispatcher; a
receiver that fails twice gets it on the third try; private addresses are refused unless
the deployment allows them."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from sandqueue import callbacks, keys
from sandqueue.sealing import generate_key
from tests.integration.conftest import StartWorker, assert_secret_absent, run_cli, wait_until
from tests.integration.http_server import ApiServer, serve_fixture

SEALING_KEY = generate_key()
ALLOW = {"SANDQUEUE_SECRET_KEYS": SEALING_KEY, "SANDQUEUE_WEBHOOK_ALLOW_PRIVATE": "true"}


class Receiver:
    """A loopback HTTP receiver that answers 500 to its first `failures` requests."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 500 if len(receiver.requests) < receiver.failures else 200
                receiver.requests.append((dict(self.headers), body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory, env=ALLOW)


@pytest.fixture(scope="module")
def strict_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory,
                             env={"SANDQUEUE_SECRET_KEYS": SEALING_KEY})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    yield r
    r.close()


def key_with_secret(redis_url: str) -> dict[str, Any]:
    done = run_cli(redis_url, "apikey", "create", "--tenant", "acme", "--json",
                   env={"SANDQUEUE_SECRET_KEYS": SEALING_KEY})
    assert done.code == 0, done.err
    created: dict[str, Any] = json.loads(done.out)
    assert created["webhook_secret"].startswith("whsec_")
    return created


def test_a_failing_receiver_gets_the_signed_result_on_the_third_try(
        server: ApiServer, receiver: Receiver, worker_factory: StartWorker, redis_url: str,
        rdb: redis.Redis) -> None:
    created = key_with_secret(redis_url)
    worker_factory(concurrency=2, env=ALLOW)
    with server.client(created["key"]) as c:
        answer = c.post("/v1/tasks", json={"prompt": "call me back",
                                           "callback_url": receiver.url})
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["id"]
        result = c.get(f"/v1/tasks/{task_id}/result", params={"wait": 55}, timeout=120).json()
    wait_until(lambda: [code for _, _, code in receiver.requests] == [500, 500, 200],
               timeout_s=60, what=lambda: f"three attempts, got {receiver.requests}")
    headers, body, _ = receiver.requests[-1]
    assert json.loads(body) == result
    assert callbacks.verify(created["webhook_secret"], headers["Sandqueue-Signature"], body)
    assert headers["Sandqueue-Delivery"] == task_id
    assert wait_until(lambda: rdb.hget(keys.webhook(task_id), "state") == b"delivered",
                      timeout_s=30)
    assert rdb.llen(keys.webhook(task_id) + ":log") == 3
    # Delivered once: nothing more arrives (the delivery left the due set).
    assert rdb.zscore(keys.WEBHOOKS_DUE, task_id) is None
    assert len(receiver.requests) == 3


def test_a_private_callback_url_is_refused_at_submit_unless_allowed(
        strict_server: ApiServer, redis_url: str) -> None:
    created = key_with_secret(redis_url)
    with strict_server.client(created["key"]) as c:
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest",
                    "http://10.0.0.8/x", "ftp://example.com/x"):
            refused = c.post("/v1/tasks", json={"prompt": "hi", "callback_url": url})
            assert refused.status_code == 422, (url, refused.text)
        sneaky = c.post("/v1/tasks", json={"prompt": "hi", "callback_url": "https://1.1.1.1/",
                                           "callback_secret": "my-own-secret-value"})
        assert sneaky.status_code == 422 and "callback_secret" in sneaky.json()["detail"]


# -- a batch's completion webhook -------------------------------------------------------------

def batch_deliveries(rdb: redis.Redis, batch_id: str) -> list[str]:
    return sorted(k.decode() for k in rdb.scan_iter(keys.webhook(f"batch:{batch_id}:*"))
                  if not k.endswith(b":log"))


def assert_delivered_once(rdb: redis.Redis, receiver: Receiver, batch_id: str) -> None:
    """One delivery record, delivered, and nothing left due: a second POST cannot come."""
    delivery = f"batch:{batch_id}:1"
    assert wait_until(lambda: rdb.hget(keys.webhook(delivery), "state") == b"delivered",
                      timeout_s=30)
    assert batch_deliveries(rdb, batch_id) == [keys.webhook(delivery)]
    assert rdb.zscore(keys.WEBHOOKS_DUE, delivery) is None
    assert rdb.hget(keys.batch(batch_id), "rounds") == b"1"
    assert [h["Sandqueue-Delivery"] for h, _, _ in receiver.requests] == [delivery]


@pytest.fixture
def ok_receiver() -> Iterator[Receiver]:
    r = Receiver(failures=0)
    yield r
    r.close()


def test_an_http_batch_posts_its_summary_once_when_its_last_task_ends(
        server: ApiServer, ok_receiver: Receiver, worker_factory: StartWorker, redis_url: str,
        rdb: redis.Redis) -> None:
    created = key_with_secret(redis_url)
    # Given two workers ending tasks side by side
    worker_factory(concurrency=4, env=ALLOW)
    worker_factory(concurrency=4, env=ALLOW)
    tasks = [{"id": f"in-{i}", "prompt": f"input {i}"} for i in range(12)]
    with server.client(created["key"]) as c:
        answer = c.post("/v1/batches", json={"tasks": tasks, "callback_url": ok_receiver.url})
        assert answer.status_code == 202, answer.text
        batch_id = answer.json()["id"]
        # When the receiver has the summary
        assert wait_until(lambda: ok_receiver.requests, timeout_s=120)
        headers, body, _ = ok_receiver.requests[0]
        # Then it is signed with the key's webhook secret and counts every task
        assert callbacks.verify(created["webhook_secret"], headers["Sandqueue-Signature"], body)
        summary = json.loads(body)
        assert summary["event"] == "batch.completed" and summary["batch_id"] == batch_id
        assert summary["by_status"] == {"succeeded": 12} and summary["total"] == 12
        assert summary["status"] == "done" and summary["ended_at"] >= summary["created_at"]
        assert summary["results"]["http"] == f"/v1/batches/{batch_id}/results"
        # every task had ended when it was sent
        assert c.get(f"/v1/batches/{batch_id}").json()["by_status"]["succeeded"] == 12
        assert_delivered_once(rdb, ok_receiver, batch_id)
        # Posting the same batch again submits nothing and sends nothing
        again = c.post("/v1/batches", json={"tasks": tasks, "callback_url": ok_receiver.url})
        assert again.json()["submitted"] == 0
        assert_delivered_once(rdb, ok_receiver, batch_id)


def test_the_dashboards_retry_failed_ends_a_new_round_with_a_new_summary(
        server: ApiServer, ok_receiver: Receiver, worker_factory: StartWorker,
        redis_url: str) -> None:
    created = key_with_secret(redis_url)
    worker_factory(concurrency=4, env=ALLOW)
    tasks = [{"prompt": "fine"}, {"prompt": "fails", "retry": {"max_attempts": 1},
                                  "envs": {"SIM_FAIL": "agent:overloaded:1"}}]
    with server.client(created["key"]) as c:
        answer = c.post("/v1/batches", json={"tasks": tasks, "callback_url": ok_receiver.url})
        assert answer.status_code == 202, answer.text
        batch_id = answer.json()["id"]
        assert wait_until(lambda: len(ok_receiver.requests) == 1, timeout_s=120)
        # When "Retry failed" is pressed on the batch's page
        assert c.post("/login", data={"api_key": created["key"], "next": "/"}).status_code == 303
        page = c.get(f"/batches/{batch_id}").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert csrf, page
        retried = c.post(f"/batches/{batch_id}/retry", data={"csrf": csrf.group(1)},
                         headers={"Origin": server.url})
        assert retried.status_code == 303
        # Then the new round ends: the batch is done again and its summary goes out again
        assert wait_until(lambda: len(ok_receiver.requests) == 2, timeout_s=120), \
            c.get(f"/v1/batches/{batch_id}").json()
        summary = json.loads(ok_receiver.requests[1][1])
        assert summary["round"] == 2 and summary["status"] == "done"
        assert c.get(f"/v1/batches/{batch_id}").json()["status"] == "done"


def test_a_cancelled_batch_posts_its_summary_with_the_cancelled_tasks(
        ok_receiver: Receiver, worker_factory: StartWorker, redis_url: str,
        rdb: redis.Redis) -> None:
    from producer.batch import submit_batch
    from tests.integration.conftest import close_client, make_client

    worker_factory(concurrency=1, env=ALLOW)  # its dispatcher delivers; it serves no "idle"
    client = make_client(redis_url, secret_keys=SEALING_KEY, webhook_allow_private=True)
    try:
        # Given a batch from the Python API, queued where no worker takes it
        handle = submit_batch([f"input {i}" for i in range(5)], client=client, queue="idle",
                              callback_url=ok_receiver.url,
                              callback_secret="whsec_python-api-secret-0123")
        assert ok_receiver.requests == []
        # When it is cancelled
        assert handle.cancel() == 5
    finally:
        close_client(client)
    # Then its summary arrives once, every task cancelled
    assert wait_until(lambda: ok_receiver.requests, timeout_s=60)
    headers, body, _ = ok_receiver.requests[0]
    assert callbacks.verify("whsec_python-api-secret-0123", headers["Sandqueue-Signature"], body)
    summary = json.loads(body)
    assert summary["by_status"] == {"cancelled": 5} and summary["status"] == "cancelled"
    assert_delivered_once(rdb, ok_receiver, handle.id)


def test_a_cli_batch_posts_its_summary_with_the_results_file(
        ok_receiver: Receiver, worker_factory: StartWorker, redis_url: str, rdb: redis.Redis,
        tmp_path: Path) -> None:
    worker_factory(concurrency=4, env=ALLOW)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"line {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    secret = "whsec_cli-configured-secret-99"
    env: dict[str, str | None] = {**ALLOW, "SANDQUEUE_WEBHOOK_SECRET": secret}
    done = run_cli(redis_url, "batch", "run", str(source), "--out", str(out), "--json",
                   "--no-progress", "--callback-url", ok_receiver.url, env=env, cwd=tmp_path)
    assert done.code == 0, done.err
    batch_id = json.loads(done.out)["batch_id"]
    assert wait_until(lambda: ok_receiver.requests, timeout_s=60)
    headers, body, _ = ok_receiver.requests[0]
    assert callbacks.verify(secret, headers["Sandqueue-Signature"], body)
    summary = json.loads(body)
    assert summary["by_status"] == {"succeeded": 5} and summary["results"]["file"] == str(out)
    assert_delivered_once(rdb, ok_receiver, batch_id)
    assert_secret_absent(rdb, secret)  # Redis holds it sealed only
    # Without a secret configured, the CLI says what to set (exit 2) and submits nothing
    refused = run_cli(redis_url, "batch", "run", str(source), "--batch-id", "other",
                      "--callback-url", ok_receiver.url, env=ALLOW, cwd=tmp_path)
    assert refused.code == 2 and "SANDQUEUE_WEBHOOK_SECRET" in refused.err
    assert not rdb.exists(keys.batch("other"))
