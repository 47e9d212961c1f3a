"""Completion webhooks end to end: a task submitted over HTTP with a `callback_url` is
POSTed, signed with its API key's webhook secret, by the real worker's dispatcher; a
receiver that fails twice gets it on the third try; private addresses are refused unless
the deployment allows them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from sandqueue import callbacks, keys
from sandqueue.sealing import generate_key
from tests.integration.conftest import StartWorker, run_cli, wait_until
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
