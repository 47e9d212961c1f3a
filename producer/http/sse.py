"""A task's progress as Server-Sent Events, read from its Redis Stream, and the result
long-poll, which waits on the same stream.

Each event's SSE `id:` is its stream entry id, so a client that reconnects with
`Last-Event-ID` (EventSource does it by itself) continues with the entry right after it:
nothing lost, nothing repeated. A comment line goes out every `api_heartbeat_s` while the
task is quiet, so proxies keep the connection open. The stream ends after the `result` event.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from producer.http.problems import Problem
from sandqueue import keys
from sandqueue.events import decode_entry
from sandqueue.store import as_text

_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}\Z")
_RESULT_LAG_S = 5.0
"""A worker publishes the `result` event just before it stores the result: after the
event, the result is looked for this long (it is normally there within milliseconds)."""


class StreamSlots:
    """Event streams and long-polls each hold a Redis connection while they wait: one
    process holds about `api_max_streams` of them at most, and answers 503 (retry, or add
    replicas) beyond that rather than failing those it already holds. A slot is counted
    only while its stream runs, so a response that never starts leaks nothing."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def check(self) -> None:
        if self.state.open_streams >= self.state.settings.api_max_streams:
            raise Problem(503, "unavailable", "this server holds as many event streams as it "
                          "may (SANDQUEUE_API_MAX_STREAMS); retry shortly",
                          headers={"Retry-After": "2"})

    async def hold(self, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        self.state.open_streams += 1
        try:
            async for frame in frames:
                yield frame
        except RedisError:
            # The client reconnects with Last-Event-ID and loses nothing.
            yield b": redis unavailable, reconnect\n\n"
        finally:
            self.state.open_streams -= 1


def start_after(last_event_id: str | None) -> str:
    """The stream position to read after: the client's Last-Event-ID, else the start."""
    if not last_event_id:
        return "0-0"
    if not _ENTRY_ID.match(last_event_id.strip()):
        raise Problem(400, "bad_request", f"Last-Event-ID {last_event_id[:64]!r} is not an "
                      "event id this API sent (they look like 1733100000000-0)")
    return last_event_id.strip()


def frame(entry_id: str | None, event: dict[str, Any]) -> bytes:
    head = f"id: {entry_id}\n" if entry_id else ""
    return f"{head}data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def task_events(r: aioredis.Redis, task_id: str, after: str, heartbeat_s: float,
                      stored_result: Callable[[], Awaitable[dict[str, Any] | None]],
                      ) -> AsyncIterator[bytes]:
    """SSE frames from entry `after` on, live, until the result event."""
    key = keys.events(task_id)
    yield b"retry: 2000\n\n"
    while True:
        answer = await r.xread({key: after}, count=100, block=int(heartbeat_s * 1000))
        if not answer:
            result = await stored_result()
            if result is None:
                yield b": heartbeat\n\n"
                continue
            # Ended, and its stream has nothing more (expired or trimmed): end with the
            # result itself, so the client still gets a last event.
            answer = await r.xread({key: after}, count=100)
            if not answer:
                yield frame(None, {"phase": "result", "status": result["status"],
                                   "error": (result.get("error") or {}).get("category")})
                return
        for _, entries in answer:
            for entry_id, fields in entries:
                after = as_text(entry_id)
                event = decode_entry(fields)
                yield frame(after, event)
                if event.get("phase") == "result":
                    return


async def wait_result(r: aioredis.Redis, task_id: str, wait_s: float,
                      stored_result: Callable[[], Awaitable[dict[str, Any] | None]],
                      ) -> dict[str, Any] | None:
    """The result, waiting up to `wait_s` for it: woken by the task's next stream entry,
    not by polling, so it answers as soon as the task ends."""
    key = keys.events(task_id)
    deadline = time.monotonic() + wait_s
    newest = await r.xrevrange(key, count=1)
    after = as_text(newest[0][0]) if newest else "0-0"
    result = await stored_result()
    while result is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        answer = await r.xread({key: after}, count=100, block=max(1, int(min(remaining, 5) * 1000)))
        ended = False
        for _, entries in answer or []:
            for entry_id, fields in entries:
                after = as_text(entry_id)
                ended = ended or decode_entry(fields).get("phase") == "result"
        result = await stored_result()
        lag_end = time.monotonic() + _RESULT_LAG_S
        while ended and result is None and time.monotonic() < min(lag_end, deadline):
            await asyncio.sleep(0.02)
            result = await stored_result()
    return result
