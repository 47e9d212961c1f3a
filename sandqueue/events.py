"""Progress events of a task, published to a Redis Stream as they happen.

Producers publish `queued`; workers every later phase (sandbox created, gateway ready, agent
started, each tool call, agent text, retrying, result).

`sandqueue watch ID` and `TaskHandle.events()` read the same stream. It is bounded
(`SANDQUEUE_EVENTS_MAX_LEN`) and expires with the result. Callers pass redacted content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from sandqueue import keys


class EventLog:
    def __init__(self, client: redis.Redis, max_len: int, ttl_s: int) -> None:
        self.r = client
        self.max_len = max_len
        self.ttl_s = ttl_s

    @staticmethod
    def entry(event: dict[str, Any]) -> dict[str, str]:
        """The stream entry of one event: its time and its JSON."""
        return {"ts": f"{time.time():.3f}", "data": json.dumps(event, default=str)}

    def publish(self, task_id: str, event: dict[str, Any], pipe: Any) -> None:
        """Append one event into `pipe` (producers; workers batch theirs)."""
        pipe.xadd(keys.events(task_id), self.entry(event), maxlen=self.max_len,
                  approximate=True)
        pipe.expire(keys.events(task_id), self.ttl_s)

    def follow(self, task_id: str, *, block_s: float = 1.0,
               stop: Any = None) -> Iterator[dict[str, Any]]:
        """Events from the first, live, until the result event (or `stop()` says so)."""
        key = keys.events(task_id)
        last = "0-0"
        stopping = False
        while True:
            # Once told to stop, one last read without blocking drains what is left.
            block = None if stopping else int(block_s * 1000)
            answer = self.r.xread({key: last}, count=100, block=block)
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = _decode(fields)
                    yield event
                    if event.get("phase") == "result":
                        return
            if stopping and not answer:
                return
            stopping = stopping or (stop is not None and stop())


def _decode(fields: dict[Any, Any]) -> dict[str, Any]:
    data = fields.get(b"data", fields.get("data"))
    ts = fields.get(b"ts", fields.get("ts"))
    event: dict[str, Any] = json.loads(data)
    event.setdefault("ts", float(ts))
    return event


decode_entry = _decode
"""One stream entry's fields -> the event (with its `ts`), for readers of the raw stream
such as the HTTP API's SSE endpoint."""
