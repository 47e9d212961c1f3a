"""One thread per worker process that stops agent runs which stall, overrun or are cancelled.

Celery's time limits do not work in the threads pool, and a thread blocked in the SDK's
stream cannot be interrupted, so each run registers a `Watch`; the watchdog ticks, and when
a run has printed nothing for the stall timeout, passed its deadline or been interrupted
(cancelled, worker stopping), it
records why and kills the command. The blocked thread then returns and reports that reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sandqueue import errors

log = logging.getLogger(__name__)


class Watch:
    def __init__(
        self,
        *,
        stall_timeout_s: float,
        deadline_at: float,
        kill: Callable[[], None],
        interrupted: Callable[[], errors.SandqueueError | None] | None = None,
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.deadline_at = deadline_at
        self._kill = kill
        self._interrupted = interrupted
        self.last_activity = time.monotonic()
        self.reason: errors.SandqueueError | None = None
        self._lock = threading.Lock()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def trip(self, reason: errors.SandqueueError) -> None:
        """Stop the run for `reason`; only the first reason counts."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        self._kill()

    def check(self) -> None:
        if self.reason is not None:
            return
        if time.time() >= self.deadline_at:
            self.trip(errors.DeadlineExceeded("the task's deadline passed while the agent ran"))
        elif time.monotonic() - self.last_activity >= self.stall_timeout_s:
            self.trip(errors.AgentStalled(
                f"the agent printed nothing for {self.stall_timeout_s:g}s and was stopped "
                "(SANDQUEUE_STALL_TIMEOUT_S)"
            ))
        elif self._interrupted is not None and (reason := self._interrupted()) is not None:
            self.trip(reason)


class Watchdog:
    def __init__(self, tick_s: float = 0.25) -> None:
        self.tick_s = tick_s
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, w: Watch) -> None:
        with self._lock:
            self._watches.add(w)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sandqueue-watchdog",
                                                daemon=True)
                self._thread.start()

    def unwatch(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)

    def _loop(self) -> None:
        """Ticks while there is something to watch; the thread ends when nothing is left
        (the next `watch` starts another), so idle pipelines hold no thread."""
        while True:
            time.sleep(self.tick_s)
            with self._lock:
                watches = list(self._watches)
                if not watches:
                    self._thread = None
                    return
            for w in watches:
                try:
                    w.check()
                except Exception:  # a broken check must not stop the others being watched
                    log.exception("watchdog check failed")
