"""The background duties of a worker process, on one thread.

Every few seconds: renew the leases of the tasks this process runs (and stop those whose
lease another worker took over), notice cancellations, hand back the tasks of dead
workers. Every minute or so: reap sandboxes that no running task owns. Duties shared by the
fleet (recovery, reaping) take a short Redis lock so one worker does each per interval.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from sandqueue import keys

if TYPE_CHECKING:
    from sandqueue.settings import Settings
    from sandqueue.store import TaskStore
    from worker.limits import Limiter
    from worker.pipeline import TaskContext
    from worker.sandbox.base import SandboxProvider

log = logging.getLogger(__name__)

ADVERTISE_INTERVAL_S = 10.0
"""How often a worker tells producers its limits (`sq:workers:limits`)."""


class Maintenance:
    """Gets what its duties touch, not the whole worker: testable on its own, and it
    cannot reach into the broker (recovery is a function the composition root gives)."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, store: TaskStore,
                 limiter: Limiter, *, worker_name: str, queues: list[str] | None,
                 active: Callable[[], dict[str, TaskContext]],
                 recover: Callable[[], object] | None,
                 provider: Callable[[], SandboxProvider]) -> None:
        self.settings = settings
        self.redis = redis_client
        self.store = store
        self.limiter = limiter
        self.worker_name = worker_name
        self.queues = queues
        self.active = active
        self._recover = recover
        self._provider = provider
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        s = settings
        self._duties: list[tuple[float, Callable[[], None]]] = [
            (min(s.lease_ttl_s / 3, 5.0), self.renew_leases),
            (1.0, self.poll_cancellations),
            (s.recover_interval_s, self.recover),
            (s.reap_interval_s, self.reap),
            (ADVERTISE_INTERVAL_S, self.advertise),
        ]
        self._due = [0.0] * len(self._duties)
        self._polls = 0

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="sandqueue-maintenance",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for i, (interval, duty) in enumerate(self._duties):
                if now < self._due[i]:
                    continue
                self._due[i] = now + interval
                try:
                    duty()
                except redis.RedisError as e:
                    log.warning("maintenance: Redis unavailable (%s); will retry", e)
                except Exception:
                    log.exception("maintenance duty %s failed", duty.__name__)

    def renew_leases(self) -> None:
        active = self.active()
        self.limiter.renew()
        lost = self.store.renew_leases(list(active), self.worker_name,
                                          self.settings.lease_ttl_s)
        for task_id in lost:
            ctx = active.get(task_id)
            if ctx is not None and not ctx.stop.is_set():
                log.warning("task %s: lease lost (another worker took the task over); "
                            "stopping this run", task_id)
                ctx.lease_lost.set()
                ctx.stop.set()
        self.beat()

    def beat(self) -> None:
        """Rewrite the health file: this thread runs and Redis answers. A container
        healthcheck (`python -m worker.health`) reads its age."""
        path = self.settings.health_file
        if not path:
            return
        self.redis.ping()  # an idle worker renews nothing: ask Redis anyway
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"worker": self.worker_name, "pid": os.getpid(),
                                   "beat_at": time.time()}))
        os.replace(tmp, target)

    def advertise(self) -> None:
        """Publish the limits this worker enforces, so producers can warn about a timeout_s
        it will clamp; entries of workers gone quiet are pruned."""
        s = self.settings
        now = time.time()
        entry = {"queues": sorted(self.queues or [s.queue]),
                 "max_timeout_s": s.max_timeout_s, "until": now + 3 * ADVERTISE_INTERVAL_S,
                 # the fleet view (sandqueue/fleet.py) reads the rest
                 "pid": os.getpid(), "host": socket.gethostname(),
                 "concurrency": s.concurrency, "in_flight": len(self.active()),
                 "max_live_sandboxes": s.live_sandbox_limit,
                 "max_creates_per_s": s.create_rate_limit, "beat_at": now}
        r = self.redis
        stale = [name for name, raw in r.hgetall(keys.WORKER_LIMITS).items()
                 if _until(raw) < now]
        pipe = r.pipeline(transaction=False)
        if stale:
            pipe.hdel(keys.WORKER_LIMITS, *stale)
        pipe.hset(keys.WORKER_LIMITS, self.worker_name, json.dumps(entry))
        pipe.expire(keys.WORKER_LIMITS, int(10 * ADVERTISE_INTERVAL_S))
        pipe.execute()

    def poll_cancellations(self) -> None:
        self._polls += 1
        if self._polls % 600 == 1:  # about every ten minutes: forget old cancellations
            horizon = time.time() - self.settings.result_expires_s
            self.redis.zremrangebyscore(keys.CANCELLED, "-inf", horizon)
        active = self.active()
        if not active:
            return
        ids = list(active)
        scores = self.redis.zmscore(keys.CANCELLED, ids)
        for task_id, score in zip(ids, scores, strict=True):
            if score is not None:
                active[task_id].cancel.set()

    def _locked(self, name: str, ttl_s: float) -> bool:
        return bool(self.redis.set(name, self.worker_name, nx=True,
                                      px=max(100, int(ttl_s * 1000))))

    def recover(self) -> None:
        if self._recover is not None and self._locked(keys.RECOVER_LOCK,
                                                      self.settings.recover_interval_s * 0.9):
            self._recover()

    def reap(self) -> None:
        if self._locked(keys.REAPER_LOCK, self.settings.reap_interval_s * 0.9):
            from worker.reaper import reap

            reap(self._provider(), self.store, self.settings)


def _until(raw: bytes | str) -> float:
    try:
        return float(json.loads(raw)["until"])
    except (ValueError, KeyError, TypeError):
        return 0.0
