"""Completion callbacks (webhooks), delivered without holding a task thread.

`after_task` is called once where a task's result is final (`worker/tasks.py`). For a task
with a `callback_url` (or the last task of a batch with one, `sandqueue/batchdone.py`) it
only records the delivery in Redis and returns:
`sq:webhook:<id>` (hash: url, sealed secret, body, state, attempts, log) and
`sq:webhooks:due` (sorted set: task id -> when the next attempt is due). One dispatcher
thread per worker process takes due deliveries (the claim moves them a lease ahead, so a
worker that dies mid-delivery leaves them to another), POSTs them signed
(`sandqueue/callbacks.py`) from a small thread pool, retries failures with doubling
backoff until `webhook_retry_for_s` has passed, and records every attempt. Delivery is at
least once: a receiver de-duplicates on the `Sandqueue-Delivery` header (the task id).

The address is checked again at delivery, on what the name resolves to then (SSRF); no
redirect is followed. A refused address is not retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis

from sandqueue import batchdone, callbacks, errors, keys, metrics
from sandqueue.sealing import Sealer
from sandqueue.settings import Settings
from sandqueue.store import as_text

log = logging.getLogger(__name__)

POLL_S = 0.5
MAX_BACKOFF_S = 300.0
LOG_KEEP = 20
# KEYS: due. ARGV: now, claim until, max. Due ids, each moved to `claim until`.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


class Dispatcher:
    def __init__(self, client: redis.Redis, settings: Settings,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.r = client
        self.settings = settings
        self.sealer = Sealer(settings.secret_keys)
        self.transport = transport  # tests: an httpx.MockTransport (sync and async)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandqueue-webhook")
        self._claim = client.register_script(_CLAIM)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def schedule(self, task_id: str, url: str, secret: str, result: dict[str, Any]) -> None:
        """Record a delivery, due now. Redis only: the task thread never waits on HTTP."""
        key = keys.webhook(task_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={"url": url, "secret": secret, "state": "pending",
                                "body": json.dumps(result, separators=(",", ":")),
                                "attempts": 0, "first_at": time.time()})
        pipe.expire(key, self.settings.result_expires_s)
        pipe.zadd(keys.WEBHOOKS_DUE, {task_id: time.time()})
        pipe.execute()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="sandqueue-webhooks",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                for task_id in self.claim_due():
                    self.pool.submit(self.deliver, task_id)
            except redis.RedisError as e:
                log.warning("webhooks: cannot read due deliveries: %s", e)

    def claim_due(self, limit: int = 50) -> list[str]:
        now = time.time()
        lease = now + self.settings.webhook_timeout_s + 30
        ids = self._claim(keys=[keys.WEBHOOKS_DUE], args=[now, lease, limit])
        return [as_text(i) for i in ids]

    def deliver(self, task_id: str) -> None:
        """One attempt; then delivered, due again later, or given up."""
        try:
            self._attempt(task_id)
        except Exception:  # a dispatcher thread must survive anything one delivery does
            log.exception("webhook of task %s: attempt crashed", task_id)

    def _attempt(self, task_id: str) -> None:
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.webhook(task_id)).items()}
        if not raw or raw.get("state") != "pending":
            self.r.zrem(keys.WEBHOOKS_DUE, task_id)
            return
        if "body" not in raw and raw.get("batch"):
            # A batch's completion: its summary is read now, off the task threads, and
            # kept so that every retry sends the same body.
            raw["body"] = json.dumps(batchdone.summary(self.r, raw["batch"]),
                                     separators=(",", ":"))
            self.r.hset(keys.webhook(task_id), "body", raw["body"])
        attempt = int(raw["attempts"]) + 1
        why = callbacks.refusal(raw["url"], allow_private=self.settings.webhook_allow_private)
        if why and "does not resolve" not in why:
            self._record(task_id, attempt, f"refused: {why}", final="refused")
            return
        outcome = why or self._post(task_id, raw, attempt)
        if outcome == "ok":
            self._record(task_id, attempt, "delivered", final="delivered")
        elif time.time() - float(raw["first_at"]) < self.settings.webhook_retry_for_s:
            self._record(task_id, attempt, outcome, retry_in=self._backoff(attempt))
        else:
            self._record(task_id, attempt, outcome, final="failed")

    def _post(self, task_id: str, raw: dict[str, str], attempt: int) -> str:
        try:
            secret = self.sealer.unseal(raw["secret"], "callback_secret")
        except errors.SandqueueError as e:
            return e.message
        body = raw["body"].encode()
        headers = {"Content-Type": "application/json", "Sandqueue-Delivery": task_id,
                   "Sandqueue-Attempt": str(attempt),
                   callbacks.SIGNATURE_HEADER: callbacks.sign(secret, int(time.time()), body)}
        try:
            response = asyncio.run(self._send(raw["url"], body, headers))
        except TimeoutError:
            return f"timed out: no complete answer within {self.settings.webhook_timeout_s:g}s"
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        return "ok" if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """One POST, `webhook_timeout_s` in all. httpx's timeouts bound each read only: a
        receiver trickling a byte every few seconds would hold a delivery thread for ever
        (and one more at every lease expiry), stalling every tenant's webhooks."""
        timeout = self.settings.webhook_timeout_s
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=False,  # type: ignore[arg-type]
                                     timeout=timeout,
                                     headers={"User-Agent": "sandqueue-webhooks"}) as http:
            return await asyncio.wait_for(http.post(url, content=body, headers=headers),
                                          timeout)

    def _backoff(self, attempt: int) -> float:
        base = self.settings.webhook_backoff_s * self.settings.backoff_scale
        return min(MAX_BACKOFF_S, base * 2 ** (attempt - 1))

    def _record(self, task_id: str, attempt: int, outcome: str, *, final: str | None = None,
                retry_in: float = 0.0) -> None:
        key = keys.webhook(task_id)
        entry = json.dumps({"attempt": attempt, "at": time.time(), "outcome": outcome})
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={"attempts": attempt, "last": outcome,
                                **({"state": final} if final else {})})
        pipe.rpush(f"{key}:log", entry)
        pipe.ltrim(f"{key}:log", -LOG_KEEP, -1)
        pipe.expire(f"{key}:log", self.settings.result_expires_s)
        if final:
            pipe.zrem(keys.WEBHOOKS_DUE, task_id)
        else:
            pipe.zadd(keys.WEBHOOKS_DUE, {task_id: time.time() + retry_in})
        pipe.execute()
        metrics.WEBHOOK_DELIVERIES.labels(outcome=final or "retry").inc()
        level = logging.INFO if final == "delivered" else logging.WARNING
        log.log(level, "webhook of task %s, attempt %d: %s", task_id, attempt, outcome)


_lock = threading.Lock()
_dispatcher: Dispatcher | None = None


def dispatcher(client: redis.Redis, settings: Settings) -> Dispatcher:
    """This process's dispatcher, started on first use (after any fork)."""
    global _dispatcher
    with _lock:
        if _dispatcher is None:
            _dispatcher = Dispatcher(client, settings)
        _dispatcher.start()
        return _dispatcher


def after_task(runtime: Any, task_id: str, args: tuple[Any, ...],
               result: dict[str, Any]) -> None:
    """The one hook: a finished task's result goes to its `callback_url`, if it has one,
    and a batch whose last task this was gets its completion webhook (`batchdone`).
    Never raises: a callback problem must not change the task's outcome."""
    try:
        task = args[0]["task"] if args and isinstance(args[0], dict) else {}
        url, secret = task.get("callback_url"), task.get("callback_secret")
        if isinstance(url, str) and isinstance(secret, str):
            dispatcher(runtime.redis, runtime.settings).schedule(task_id, url, secret, result)
        batch_id = (task.get("labels") or {}).get("batch")
        if isinstance(batch_id, str) and batch_id:
            batchdone.task_ended(runtime.redis, batch_id, task_id,
                                 runtime.settings.result_expires_s)
    except Exception:
        log.exception("task %s: could not schedule its callback", task_id)

