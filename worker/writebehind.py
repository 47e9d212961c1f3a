"""Progress writes of all of a worker's tasks, batched into one Redis pipeline per tick.

Events and state fields are informative: a few milliseconds of delay costs nothing, while a
round trip per write made Redis I/O the worker's main cost (see BENCHMARKS.md). One thread
drains a FIFO of write closures into a pipeline every `tick_s`, so each task's writes keep
their order. Writes the guarantees depend on (leases, attempt numbers, tool calls) do not go
through here; `sync()` makes everything queued so far visible before a result is stored.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

Write = Callable[[Any], None]
"""Adds commands to the pipeline it is given."""


class WriteBehind:
    def __init__(self, client: redis.Redis, tick_s: float = 0.02, max_batch: int = 2000) -> None:
        self.r = client
        self.tick_s = tick_s
        self.max_batch = max_batch
        self._queue: deque[tuple[int, Write]] = deque()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._seq = 0
        self._flushed = 0
        self._thread: threading.Thread | None = None

    def submit(self, write: Write) -> int:
        with self._lock:
            self._seq += 1
            self._queue.append((self._seq, write))
            seq = self._seq
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sandqueue-writer",
                                                daemon=True)
                self._thread.start()
        return seq

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
        while True:
            with self._lock:
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), self.max_batch))]
            if not batch:
                return
            pipe = self.r.pipeline(transaction=False)
            for _, write in batch:
                write(pipe)
            try:
                pipe.execute()
            except redis.RedisError as e:
                # Progress is informative: log and move on rather than stall every task.
                log.warning("could not write %d progress update(s): %s", len(batch), e)
            with self._done:
                self._flushed = batch[-1][0]
                self._done.notify_all()
