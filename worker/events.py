"""Progress events of a task, published to a Redis Stream as they happen.

`sandqueue watch ID` and `TaskHandle.events()` read the same stream. It is bounded
(`SANDQUEUE_EVENTS_MAX_LEN`) and expires with the result. Callers pass redacted content.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from sandqueue import keys

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, client: redis.Redis, max_len: int, ttl_s: int) -> None:
        self.r = client
        self.max_len = max_len
        self.ttl_s = ttl_s

    def publish(self, task_id: str, event: dict[str, Any], *, final: bool = False) -> None:
        """Append one event. Progress reporting must never fail the task: errors are logged."""
        key = keys.events(task_id)
        payload = {"ts": f"{time.time():.3f}", "data": json.dumps(event, default=str)}
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(key, payload, maxlen=self.max_len, approximate=True)
            pipe.expire(key, self.ttl_s)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("task %s: could not publish event: %s", task_id, e)
