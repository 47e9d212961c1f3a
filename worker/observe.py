"""What a worker tells the outside about its tasks, besides their records and events.

The pipeline already reports every phase through two hooks of its `TaskContext`: progress
events (`sandbox_created`, `gateway_ready`, `agent_started`, `retrying`, ...) and attempt
records (when an attempt starts, gets a sandbox, starts its agent, ends). The observer wraps
those two hooks, so the pipeline needs no code of its own for it, and turns them into:

- fleet-wide counters in Redis (`sq:stats:*`: sandboxes created, 429s), which
  `sandqueue/fleet.py` turns into rates for the dashboard and the fleet gauges;
"""

from __future__ import annotations

import time
from typing import Any

from sandqueue import keys
from sandqueue.contract import AttemptRecord
from worker.pipeline import TaskContext
from worker.writebehind import WriteBehind

STATS_TTL_S = 600
"""A counter window outlives the minute the fleet view reads by a wide margin."""


class Observer:
    def __init__(self, writer: WriteBehind) -> None:
        self.writer = writer

    def watch(self, ctx: TaskContext) -> None:
        """Wrap the context's event and attempt hooks (the originals still run first)."""
        on_event, on_attempt = ctx.on_event, ctx.on_attempt

        def event(data: dict[str, Any]) -> None:
            on_event(data)
            self._event(data)

        def attempt(entry: AttemptRecord) -> None:
            on_attempt(entry)
            self._attempt(entry)

        ctx.on_event, ctx.on_attempt = event, attempt

    def _event(self, data: dict[str, Any]) -> None:
        if data.get("phase") == "sandbox_created":
            self.count("creates")

    def _attempt(self, entry: AttemptRecord) -> None:
        if entry.ended_at is not None and entry.outcome == "rate_limited":
            self.count("rate_limited")

    def count(self, name: str) -> None:
        """One more in this window's fleet-wide counter (batched with the progress writes)."""
        key = keys.stats(name, int(time.time() // keys.STATS_WINDOW_S))

        def write(pipe: Any) -> None:
            pipe.incr(key)
            pipe.expire(key, STATS_TTL_S)

        self.writer.submit(write)
