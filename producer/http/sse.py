"""A task's progress as Server-Sent Events, read from its Redis Stream, and the result
long-poll, which waits on the same stream.

One reader per process follows every stream (`fanout.py`). Each event's SSE `id:` is its
stream entry id, so a client that reconnects with
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

from redis.exceptions import RedisError

from producer.http.fanout import StreamHub, entry_order
from producer.http.problems import Problem
from sandqueue import keys
from sandqueue.events import decode_entry
from sandqueue.store import as_text

_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}\Z")
_RESULT_LAG_S = 5.0
"""A worker publishes the `result` event just before it stores the result: after the
event, the result is looked for this long (it is normally there within milliseconds)."""


class StreamSlots:
    """Event streams and long-polls share one Redis reader (`fanout.py`), but each holds a
    socket, a queue and a task: one process holds about `api_max_streams` of them at most,
    and answers 503 (retry, or add replicas) beyond that rather than failing those it
    already holds. A slot is counted only while its stream runs, so a response that never
    starts leaks nothing."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def check(self) -> None:
        if self.state.open_streams >= self.state.settings.api_max_streams:
            raise Problem(503, "unavailable", "this server holds as many event streams as it "
                          "may (SANDQUEUE_API_MAX_STREAMS); retry shortly",
                          headers={"Retry-After": "2"})

    async def hold(self, frames: AsyncIterator[bytes],
                   allowed: Callable[[], Awaitable[bool]] | None = None,
                   ) -> AsyncIterator[bytes]:
        """`frames`, counted; with `allowed`, the caller's credentials are checked again
        before a frame once every heartbeat interval (a quiet stream sends a heartbeat that
        often): a key revoked or expired, or a dashboard session ended, ends its open
        streams too, not only its next requests. The client's reconnect then gets 401."""
        self.state.open_streams += 1
        every_s = self.state.settings.api_heartbeat_s
        checked = time.monotonic()
        try:
            async for frame in _until(frames, getattr(self.state, "stopping", None)):
                if allowed is not None and time.monotonic() - checked >= every_s:
                    checked = time.monotonic()
                    if not await allowed():
                        yield b": access ended (API key revoked or expired, or logged out)\n\n"
                        return
                yield frame
        except RedisError:
            # The client reconnects with Last-Event-ID and loses nothing.
            yield b": redis unavailable, reconnect\n\n"
        finally:
            self.state.open_streams -= 1


async def _until(frames: AsyncIterator[bytes], stopping: asyncio.Event | None
                 ) -> AsyncIterator[bytes]:
    """`frames` until the server begins to shut down (`stopping`, set at SIGINT/SIGTERM by
    `app.py`): then a comment and the end, so the client reconnects to another replica at
    once rather than being cut off after uvicorn's grace."""
    if stopping is None:
        async for frame in frames:
            yield frame
        return
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(frames))
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                yield b": the server is shutting down; reconnect\n\n"
                return
            try:
                frame = step.result()
            except StopAsyncIteration:
                return
            yield frame
    finally:
        stop.cancel()


async def polled(step: Callable[[], Awaitable[tuple[bytes | None, bool]]],
                 heartbeat_s: float, poll_s: float) -> AsyncIterator[bytes]:
    """A stream read by polling (batch progress, the dashboard's live rows): every `poll_s`,
    `step` answers (a frame when something changed or None, whether the stream is done); a
    heartbeat comment goes out when nothing has for `heartbeat_s`."""
    quiet = 0.0
    while True:
        chunk, done = await step()
        if chunk is not None:
            quiet = 0.0
            yield chunk
        elif quiet >= heartbeat_s:
            quiet = 0.0
            yield b": heartbeat\n\n"
        if done:
            return
        await asyncio.sleep(poll_s)
        quiet += poll_s


def start_after(last_event_id: str | None) -> str:
    """The stream position to read after: the client's Last-Event-ID, else the start."""
    if not last_event_id:
        return "0-0"
    if not _ENTRY_ID.match(last_event_id.strip()):
        raise Problem(400, "bad_request", f"Last-Event-ID {last_event_id[:64]!r} is not an "
                      "event id this API sent (they look like 1733100000000-0)")
    return last_event_id.strip()


async def had_the_result(aredis: Any, task_id: str, after: str) -> bool:
    """Whether a client resuming after `after` already has the task's `result` event (the
    stream's last entry, at or before `after`): its stream is over. EventSource reconnects
    whenever the server closes, so without this it would be sent the result again."""
    if after == "0-0":
        return False
    last = await aredis.xrevrange(keys.events(task_id), count=1)
    if not last:
        return False
    entry_id, fields = last[0]
    return (decode_entry(fields).get("phase") == "result"
            and entry_order(as_text(entry_id)) <= entry_order(after))


def frame(entry_id: str | None, event: dict[str, Any]) -> bytes:
    head = f"id: {entry_id}\n" if entry_id else ""
    return f"{head}data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def task_events(hub: StreamHub, task_id: str, after: str, heartbeat_s: float,
                      stored_result: Callable[[], Awaitable[dict[str, Any] | None]],
                      ) -> AsyncIterator[bytes]:
    """SSE frames from entry `after` on, live, until the result event: the backlog read
    directly, then the live entries the process's one reader fans out (`fanout.py`)."""
    key = keys.events(task_id)
    yield b"retry: 2000\n\n"
    sub = await hub.subscribe(key)  # before the backlog: no entry falls between the two
    try:
        last = [after]
        async for chunk in _catch_up(hub, key, last):
            yield chunk
            if chunk is _END:
                return
        while True:
            if sub.dropped and sub.queue.empty():
                yield f": {sub.dropped}\n\n".encode()
                return
            try:
                item = await asyncio.wait_for(sub.queue.get(), heartbeat_s)
            except TimeoutError:
                async for chunk in _quiet(hub, key, last, stored_result):
                    yield chunk
                    if chunk is _END:
                        return
                continue
            if item is None or entry_order(item[0]) <= entry_order(last[0]):
                continue  # a wake-up, or an entry the backlog already sent
            last[0] = item[0]
            yield frame(item[0], item[1])
            if item[1].get("phase") == "result":
                return
    finally:
        hub.unsubscribe(sub)


_END = b""
"""Yielded (never sent) after the result event: the stream is over."""


async def _catch_up(hub: StreamHub, key: str, last: list[str]) -> AsyncIterator[bytes]:
    """Frames of the entries after `last[0]` that are in the stream now (a non-blocking
    read), advancing `last[0]`; `_END` after the result event."""
    while True:
        answer = await hub.redis.xread({key: last[0]}, count=200)
        if not answer:
            return
        for _, entries in answer:
            for entry_id, fields in entries:
                last[0] = as_text(entry_id)
                event = decode_entry(fields)
                yield frame(last[0], event)
                if event.get("phase") == "result":
                    yield _END
                    return


async def _quiet(hub: StreamHub, key: str, last: list[str],
                 stored_result: Callable[[], Awaitable[dict[str, Any] | None]],
                 ) -> AsyncIterator[bytes]:
    """Nothing new for a heartbeat: a heartbeat, unless the task has ended. Then whatever
    its stream still holds, or (expired or trimmed) the result itself as the last event."""
    result = await stored_result()
    if result is None:
        yield b": heartbeat\n\n"
        return
    sent = False
    async for chunk in _catch_up(hub, key, last):
        sent = True
        yield chunk
        if chunk is _END:
            return
    if not sent:
        yield frame(None, {"phase": "result", "status": result["status"],
                           "error": (result.get("error") or {}).get("category")})
        yield _END


async def wait_result(hub: StreamHub, task_id: str, wait_s: float,
                      stored_result: Callable[[], Awaitable[dict[str, Any] | None]],
                      ) -> dict[str, Any] | None:
    """The result, waiting up to `wait_s` for it: woken by the task's next stream entry
    (from the process's one reader), not by polling, so it answers as soon as it ends."""
    deadline = time.monotonic() + wait_s
    sub = await hub.subscribe(keys.events(task_id))  # before looking: no wake-up is missed
    try:
        result = await stored_result()
        while result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or sub.dropped:
                return None
            try:
                item = await asyncio.wait_for(sub.queue.get(), min(remaining, 5))
            except TimeoutError:
                item = None
            ended = item is not None and item[1].get("phase") == "result"
            result = await stored_result()
            lag_end = time.monotonic() + _RESULT_LAG_S
            while ended and result is None and time.monotonic() < min(lag_end, deadline):
                await asyncio.sleep(0.02)
                result = await stored_result()
        return result
    finally:
        hub.unsubscribe(sub)
