"""Completion callbacks: the worker's dispatcher signs, retries with backoff, records every
attempt, and refuses private addresses unless allowed. Real Lua on fakeredis; the receiver
is an httpx MockTransport (the dispatcher's own HTTP client, minus the network)."""

from __future__ import annotations

import json
import time

import fakeredis
import httpx
import pytest

from sandqueue import callbacks, keys
from sandqueue.sealing import Sealer, generate_key
from sandqueue.settings import Settings
from worker.webhooks import Dispatcher

SECRET = "whsec_test-secret-of-enough-length"
RESULT = {"task_id": "t1", "status": "succeeded", "result": "done"}


def make(handler: object, **settings: object) -> tuple[Dispatcher, fakeredis.FakeRedis, str]:
    key = generate_key()
    config = Settings(_env_file=None, secret_keys=key, backoff_scale=0,  # type: ignore[call-arg]
                      **settings)
    r = fakeredis.FakeRedis()
    d = Dispatcher(r, config, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return d, r, Sealer(key).seal(SECRET)


def run_until_done(d: Dispatcher, r: fakeredis.FakeRedis, rounds: int = 10) -> None:
    for _ in range(rounds):
        for task_id in d.claim_due():
            d.deliver(task_id)
        if not r.zcard(keys.WEBHOOKS_DUE):
            return


def attempts(r: fakeredis.FakeRedis) -> list[dict[str, object]]:
    return [json.loads(x) for x in r.lrange(keys.webhook("t1") + ":log", 0, -1)]


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout() -> None:
    """httpx's timeouts bound each read: a receiver sending a byte every few seconds would
    hold a delivery thread for ever (and, at each lease expiry, one more). One attempt has
    `webhook_timeout_s` in all."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.2):  # well inside the read timeout, for ever
                conn.sendall(b"a")

    threading.Thread(target=trickle, daemon=True).start()
    key = generate_key()
    config = Settings(_env_file=None, secret_keys=key, backoff_scale=0,  # type: ignore[call-arg]
                      webhook_allow_private=True, webhook_timeout_s=1.0)
    r = fakeredis.FakeRedis()
    d = Dispatcher(r, config)
    d.schedule("t1", f"http://127.0.0.1:{listener.getsockname()[1]}/hook",
               Sealer(key).seal(SECRET), RESULT)
    done = threading.Event()
    try:
        threading.Thread(target=lambda: (d.deliver(d.claim_due()[0]), done.set()),
                         daemon=True).start()
        assert done.wait(30), "the attempt was still running 30 s after a 1 s timeout"
        assert "time" in str(attempts(r)[0]["outcome"]).lower()
    finally:
        stop.set()
        listener.close()


def test_verify_rejects_a_replayed_old_signature() -> None:
    # The README: a receiver "rejects old timestamps (`sandqueue.callbacks.verify` does it)".
    body = b'{"task_id": "t1"}'
    header = callbacks.sign(SECRET, 1_000_000, body)
    assert callbacks.verify(SECRET, header, body, now=1_000_000 + 60)
    assert not callbacks.verify(SECRET, header, body, now=1_000_000 + 3600)
    assert not callbacks.verify(SECRET, header, body, now=1_000_000 - 3600)  # from the future
    assert callbacks.verify(SECRET, header, body, max_age_s=None, now=1_000_000 + 3600)
    fresh = callbacks.sign(SECRET, int(time.time()), body)
    assert callbacks.verify(SECRET, fresh, body)
    assert not callbacks.verify(SECRET, fresh, body + b" ")


def test_delivered_once_with_a_signature_the_receiver_can_verify() -> None:
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    d, r, sealed = make(receiver, webhook_allow_private=False)
    d.schedule("t1", "https://93.184.216.34/hook", sealed, RESULT)
    run_until_done(d, r)
    assert len(seen) == 1
    request = seen[0]
    assert json.loads(request.content) == RESULT
    assert callbacks.verify(SECRET, request.headers["Sandqueue-Signature"], request.content)
    assert not callbacks.verify("another secret", request.headers["Sandqueue-Signature"],
                                request.content)
    assert request.headers["Sandqueue-Delivery"] == "t1"
    assert r.hget(keys.webhook("t1"), "state") == b"delivered"
    assert SECRET.encode() not in b"".join(v for v in r.hgetall(keys.webhook("t1")).values())


def test_a_receiver_failing_twice_gets_it_on_the_third_try() -> None:
    codes = iter([500, 503, 200])
    d, r, sealed = make(lambda request: httpx.Response(next(codes)),
                        webhook_allow_private=False)
    d.schedule("t1", "https://93.184.216.34/hook", sealed, RESULT)
    run_until_done(d, r)
    assert [a["outcome"] for a in attempts(r)] == ["HTTP 500", "HTTP 503", "delivered"]
    assert r.hget(keys.webhook("t1"), "state") == b"delivered"


def test_it_gives_up_after_the_retry_period() -> None:
    d, r, sealed = make(lambda request: httpx.Response(500), webhook_retry_for_s=0)
    d.schedule("t1", "https://93.184.216.34/hook", sealed, RESULT)
    run_until_done(d, r)
    assert [a["outcome"] for a in attempts(r)] == ["HTTP 500"]
    assert r.hget(keys.webhook("t1"), "state") == b"failed"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.0.0.7/hook",
                                 "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/hook", "http://localhost/hook"])
def test_a_private_address_is_refused_unless_allowed(url: str) -> None:
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    d, r, sealed = make(receiver)
    d.schedule("t1", url, sealed, RESULT)
    run_until_done(d, r)
    assert seen == [] and r.hget(keys.webhook("t1"), "state") == b"refused"
    d, r, sealed = make(receiver, webhook_allow_private=True)
    d.schedule("t1", url, sealed, RESULT)
    run_until_done(d, r)
    assert len(seen) == 1 and r.hget(keys.webhook("t1"), "state") == b"delivered"


def test_a_redirect_is_not_followed() -> None:
    seen: list[str] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/"})

    d, r, sealed = make(receiver, webhook_retry_for_s=0)
    d.schedule("t1", "https://93.184.216.34/hook", sealed, RESULT)
    run_until_done(d, r)
    assert seen == ["https://93.184.216.34/hook"]
