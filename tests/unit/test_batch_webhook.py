"""A batch's completion webhook is claimed exactly once, by whoever ends its last task.

Given a batch with a callback and open tasks, when many enders report at the same instant
(threads on one Redis, the Lua script deciding), then exactly one of them completes the
batch and exactly one delivery is due; a batch is not complete before it is sealed; a resumed
batch with new tasks opens a new round. Real Lua on fakeredis; the dispatcher's HTTP client
is an httpx MockTransport."""

from __future__ import annotations

import json
import threading

import fakeredis
import httpx

from sandqueue import batchdone, callbacks, keys
from sandqueue.sealing import Sealer, generate_key
from sandqueue.settings import Settings
from worker.webhooks import Dispatcher

TTL = 3600
BATCH = "b0123456789abcdef"
SECRET = "whsec_batch-secret-of-enough-length"


def given_batch(r: fakeredis.FakeRedis, n: int, *, sealed_secret: str = "sealed",
                status: str = "running") -> list[str]:
    r.hset(keys.batch(BATCH), mapping={"callback_url": "https://1.1.1.1/hook", "total": n,
                                       "callback_secret": sealed_secret, "status": "running",
                                       "created_at": 1000.0})
    ids = [f"task-{i}" for i in range(n)]
    for i, task_id in enumerate(ids):
        r.hset(keys.task(task_id), mapping={"status": status, "cost_usd": 0.25})
        r.hset(keys.batch(BATCH, "items"), f"line-{i}", task_id)
    batchdone.track(r, BATCH, ids, TTL)
    return ids


def end(r: fakeredis.FakeRedis, task_id: str, status: str = "succeeded") -> str | None:
    r.hset(keys.task(task_id), "status", status)
    return batchdone.task_ended(r, BATCH, task_id, TTL)


def test_of_many_concurrent_enders_exactly_one_completes_the_batch() -> None:
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    ids = given_batch(r, 24)
    assert batchdone.seal(r, BATCH, TTL) is None  # all still open
    for task_id in ids:
        r.hset(keys.task(task_id), "status", "failed" if task_id.endswith("3") else "succeeded")
    start = threading.Barrier(len(ids))
    fired: list[str | None] = []

    def ender(task_id: str) -> None:
        mine = fakeredis.FakeRedis(server=server)  # one connection per worker thread
        start.wait()
        fired.append(batchdone.task_ended(mine, BATCH, task_id, TTL))
        fired.append(batchdone.task_ended(mine, BATCH, task_id, TTL))  # reported twice

    threads = [threading.Thread(target=ender, args=(t,)) for t in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    claims = [f for f in fired if f is not None]
    assert claims == [f"batch:{BATCH}:1"]
    assert [m.decode() for m in r.zrange(keys.WEBHOOKS_DUE, 0, -1)] == claims
    delivery = r.hgetall(keys.webhook(claims[0]))
    assert delivery[b"url"] == b"https://1.1.1.1/hook" and delivery[b"batch"] == BATCH.encode()
    assert delivery[b"state"] == b"pending" and delivery[b"secret"] == b"sealed"
    assert r.hget(keys.batch(BATCH), "status") == b"done"


def test_nothing_fires_before_the_batch_is_sealed_and_sealing_twice_fires_once() -> None:
    r = fakeredis.FakeRedis()
    ids = given_batch(r, 3)
    assert [end(r, t) for t in ids] == [None, None, None]  # still submitting
    assert batchdone.seal(r, BATCH, TTL) == f"batch:{BATCH}:1"
    assert batchdone.seal(r, BATCH, TTL) is None
    assert r.zcard(keys.WEBHOOKS_DUE) == 1


def test_sealing_sweeps_out_tasks_whose_end_nobody_reported() -> None:
    r = fakeredis.FakeRedis()
    ids = given_batch(r, 2)
    r.hset(keys.task(ids[0]), "status", "succeeded")  # its worker died before telling
    r.delete(keys.task(ids[1]))  # expired
    assert batchdone.seal(r, BATCH, TTL) == f"batch:{BATCH}:1"


def test_a_task_that_ended_before_it_was_tracked_is_not_waited_for() -> None:
    r = fakeredis.FakeRedis()
    given_batch(r, 0)
    r.hset(keys.task("fast"), "status", "succeeded")
    r.hset(keys.task("slow"), "status", "running")
    assert batchdone.track(r, BATCH, ["fast", "slow"], TTL) == 1
    assert batchdone.seal(r, BATCH, TTL) is None
    assert end(r, "slow") == f"batch:{BATCH}:1"


def test_a_resumed_batch_with_new_tasks_is_delivered_again_a_resubmit_is_not() -> None:
    r = fakeredis.FakeRedis()
    ids = given_batch(r, 2)
    batchdone.seal(r, BATCH, TTL)
    assert [end(r, t) for t in ids] == [None, f"batch:{BATCH}:1"]
    # Posting the same batch again: nothing new is submitted, nothing is sent.
    assert batchdone.track(r, BATCH, ids, TTL) == 0
    assert batchdone.seal(r, BATCH, TTL) is None
    # --retry-failed: a new task for an input opens round 2.
    r.hset(keys.task("retry-0"), "status", "queued")
    assert batchdone.track(r, BATCH, ["retry-0"], TTL) == 1
    assert batchdone.seal(r, BATCH, TTL) is None
    assert end(r, "retry-0") == f"batch:{BATCH}:2"


def test_a_batch_without_a_callback_tracks_nothing() -> None:
    r = fakeredis.FakeRedis()
    r.hset(keys.task("t"), "status", "running")
    assert batchdone.track(r, "plain", ["t"], TTL) == 0
    assert batchdone.seal(r, "plain", TTL) is None
    assert not r.exists(keys.batch("plain", "open"))


def test_the_dispatcher_sends_the_summary_signed_with_the_batch_secret() -> None:
    key = generate_key()
    settings = Settings(_env_file=None, secret_keys=key, backoff_scale=0)  # type: ignore[call-arg]
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500 if len(seen) == 1 else 204)

    r = fakeredis.FakeRedis()
    d = Dispatcher(r, settings, transport=httpx.MockTransport(receiver))
    ids = given_batch(r, 3, sealed_secret=Sealer(key).seal(SECRET))
    r.hset(keys.batch(BATCH), "total", 4)  # one input never submitted (a budget stopped it)
    batchdone.seal(r, BATCH, TTL)
    for task_id, status in zip(ids, ("succeeded", "failed", "cancelled"), strict=True):
        delivery = end(r, task_id, status)
    assert delivery is not None
    for _ in range(5):
        for due in d.claim_due():
            d.deliver(due)
    assert len(seen) == 2 and seen[0].content == seen[1].content  # the retry sends the same
    body = json.loads(seen[1].content)
    assert body["event"] == "batch.completed" and body["batch_id"] == BATCH
    assert body["by_status"] == {"succeeded": 1, "failed": 1, "cancelled": 1, "unsubmitted": 1}
    assert body["cost_usd"] == 0.75 and body["total"] == 4 and body["status"] == "done"
    assert body["results"]["http"] == f"/v1/batches/{BATCH}/results"
    assert body["ended_at"] >= body["created_at"]
    assert seen[1].headers["Sandqueue-Delivery"] == delivery
    assert callbacks.verify(SECRET, seen[1].headers[callbacks.SIGNATURE_HEADER], seen[1].content)
    assert r.hget(keys.webhook(delivery), "state") == b"delivered"
