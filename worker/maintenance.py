"""The background duties of a worker process, on one thread.

Every few seconds: renew the leases of the tasks this process runs (and stop those whose
lease another worker took over), notice cancellations, hand back the tasks of dead
workers. Every minute or so: reap sandboxes that no running task owns. Duties shared by the
fleet (recovery, reaping) take a short Redis lock so one worker does each per interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from sandqueue import keys

if TYPE_CHECKING:
    from worker.runtime import Runtime

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        s = runtime.settings
        self._duties: list[tuple[float, Callable[[], None]]] = [
            (min(s.lease_ttl_s / 3, 5.0), self.renew_leases),
            (1.0, self.poll_cancellations),
            (s.recover_interval_s, self.recover),
            (s.reap_interval_s, self.reap),
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
        active = self.rt.active_contexts()
        self.rt.limiter.renew()
        lost = self.rt.store.renew_leases(list(active), self.rt.worker_name,
                                          self.rt.settings.lease_ttl_s)
        for task_id in lost:
            ctx = active.get(task_id)
            if ctx is not None and not ctx.stop.is_set():
                log.warning("task %s: lease lost (another worker took the task over); "
                            "stopping this run", task_id)
                ctx.lease_lost.set()
                ctx.stop.set()

    def poll_cancellations(self) -> None:
        self._polls += 1
        if self._polls % 600 == 1:  # about every ten minutes: forget old cancellations
            horizon = time.time() - self.rt.settings.result_expires_s
            self.rt.redis.zremrangebyscore(keys.CANCELLED, "-inf", horizon)
        active = self.rt.active_contexts()
        if not active:
            return
        ids = list(active)
        scores = self.rt.redis.zmscore(keys.CANCELLED, ids)
        for task_id, score in zip(ids, scores, strict=True):
            if score is not None:
                active[task_id].cancel.set()

    def _locked(self, name: str, ttl_s: float) -> bool:
        return bool(self.rt.redis.set(name, self.rt.worker_name, nx=True,
                                      px=max(100, int(ttl_s * 1000))))

    def recover(self) -> None:
        if self._locked(keys.RECOVER_LOCK, self.rt.settings.recover_interval_s * 0.9):
            from worker.leases import recover_orphans

            recover_orphans(self.rt.celery_app, self.rt.store, self.rt.settings.lease_ttl_s)

    def reap(self) -> None:
        if self._locked(keys.REAPER_LOCK, self.rt.settings.reap_interval_s * 0.9):
            from worker.reaper import reap

            reap(self.rt.pipeline.provider, self.rt.store, self.rt.settings)
