"""Progress writes of all of a worker's tasks, batched into one Redis pipeline per tick.

Events and state fields tolerate a few milliseconds of delay, while a round trip per write
made Redis I/O the worker's main cost (see BENCHMARKS.md). One thread drains a FIFO of
write closures into a pipeline every `tick_s`, so each task's writes keep their order;
updates of one hash between two flushes merge into one HSET. A batch that fails (Redis
down) is kept and retried, so final states and lease releases land once Redis is back.
Writes the guarantees depend on at once (leases, attempt numbers, tool calls) do not go
through here; `sync()` makes everything queued so far visible before a result is stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

Write = Callable[[Any], None]
"""Adds commands to the pipeline it is given."""


class WriteBehind:
    def __init__(self, client: redis.Redis, tick_s: float = 0.02) -> None:
        self.r = client
        self.tick_s = tick_s
        self._queue: list[Write] = []
        self._hsets: dict[str, dict[str, Any]] = {}
        self._expires: dict[str, int] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._seq = 0
        self._flushed = 0
        self._thread: threading.Thread | None = None
        self._failures = 0

    def submit(self, write: Write) -> None:
        """Queue arbitrary commands (added to the next pipeline in order)."""
        with self._lock:
            self._queue.append(write)
            self._queued()

    def hset(self, key: str, mapping: dict[str, Any], ttl_s: int) -> None:
        """Set hash fields; updates of one key between two flushes merge into one HSET."""
        with self._lock:
            pending = self._hsets.get(key)
            if pending is not None:
                pending.update(mapping)
            else:
                merged = dict(mapping)
                self._hsets[key] = merged
                self._queue.append(lambda p: p.hset(key, mapping=merged))
            self._expires[key] = ttl_s
            self._queued()

    def xadd(self, key: str, fields: dict[str, Any], max_len: int, ttl_s: int) -> None:
        """Append to a stream (bounded); its expiry is set once per flush."""
        with self._lock:
            self._queue.append(lambda p: p.xadd(key, fields, maxlen=max_len, approximate=True))
            self._expires[key] = ttl_s
            self._queued()

    def _queued(self) -> None:
        self._seq += 1
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="sandqueue-writer",
                                            daemon=True)
            self._thread.start()

    def sync(self, timeout_s: float = 10.0) -> bool:
        """Wait until every write submitted before this call has been sent."""
        with self._lock:
            target = self._seq
            if self._flushed >= target:
                return True
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._flushed >= target, timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.tick_s)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            if not self._queue:
                return
            batch, self._queue = self._queue, []
            expires, self._expires = self._expires, {}
            self._hsets = {}
            upto = self._seq
        pipe = self.r.pipeline(transaction=False)
        for write in batch:
            write(pipe)
        for key, ttl_s in expires.items():
            pipe.expire(key, ttl_s)
        try:
            pipe.execute()
        except redis.RedisError as e:
            # Keep them, in order, ahead of anything newer, and try again after a pause:
            # final states and lease releases must land once Redis is back.
            log.warning("could not write %d progress update(s), will retry: %s",
                        len(batch), e)
            with self._lock:
                self._queue = batch + self._queue
                self._expires = {**expires, **self._expires}
                self._failures += 1
                pause = min(2.0, 0.1 * 2 ** self._failures)
            time.sleep(pause)
            return
        with self._done:
            self._failures = 0
            self._flushed = upto
            self._done.notify_all()
