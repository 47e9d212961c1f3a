"""One Redis connection reads the event streams of every SSE client of a `serve` process.

Each open event stream (and result long-poll) used to hold a Redis connection blocked in its
own XREAD. Here one reader task blocks in a single XREAD over every stream key someone
follows, from the last entry it has fanned out of each, and puts each new entry into the
bounded asyncio queue of every connection following that key. Short, non-blocking reads (a
new follower's backlog, a stored result) share a small pool. So a process holds
`api_max_streams` streams with a few connections, and Redis has one blocked client.

A connection `subscribe`s before it reads its backlog: for a key nobody followed, the reader
starts after the stream's newest entry at that moment, so everything after it reaches the
queue and everything up to it is in the backlog (the follower skips what it already sent:
no gap, no duplicate). A new key reaches the blocked XREAD at once: the reader is woken with
CLIENT UNBLOCK. A connection whose queue is full (its client reads too slowly) is dropped,
not waited for: it sends what it has and ends with a comment, and its client resumes with
Last-Event-ID. If Redis fails, every follower is dropped the same way. A queue holds
`queue_max` (1000) entries and one read brings at most `count` (200) per stream, so a
follower is dropped only when it is several reads behind, never for one burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sandqueue.events import decode_entry
from sandqueue.store import as_text

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, Any]]
CLIENT_NAME = "sandqueue-sse"


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable pair (`1733100000000-3` -> (1733100000000, 3))."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Subscription:
    key: str
    queue: asyncio.Queue[Entry | None]
    dropped: str | None = None
    """Why the hub stopped feeding it (too slow, Redis unavailable, shutting down)."""
    closed: bool = field(default=False)


class StreamHub:
    def __init__(self, url: str, *, queue_max: int = 1000, block_ms: int = 5000,
                 pool_size: int = 8, count: int = 200) -> None:
        self.queue_max = queue_max
        self.block_ms = block_ms
        self.count = count
        self.reader = aioredis.Redis.from_url(
            url, single_connection_client=True, client_name=CLIENT_NAME,
            socket_connect_timeout=5, socket_timeout=block_ms / 1000 + 30)
        self.redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=30, client_name=CLIENT_NAME,
            socket_connect_timeout=5, socket_timeout=30,
            # An idle connection Redis closed (a restart) is replaced, not an error.
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError]))
        """Short reads of the followers (backlogs, stored results)."""
        self.positions: dict[str, str] = {}
        self.subs: dict[str, set[Subscription]] = {}
        self._generation = 0
        self._read_generation = -1
        self._reader_id: int | None = None
        self._wanted = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._waker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sandqueue-sse-reader")

    async def close(self) -> None:
        """End the reader (woken, not cancelled: redis-py can hang cancelling a blocked
        read), then every follower."""
        self._closing = True
        self._wanted.set()
        if self._reader_id is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.client_unblock(self._reader_id)
        for task in (self._task, self._waker):
            if task is not None and not task.done():
                await asyncio.wait([task], timeout=self.block_ms / 1000 + 1)
                task.cancel()
        self._drop_all("the server is shutting down")
        await self.reader.aclose()
        await self.redis.aclose()

    # -- followers ------------------------------------------------------------------------
    async def subscribe(self, key: str) -> Subscription:
        """Entries of `key` added from now on go to the returned subscription's queue."""
        start = None
        if key not in self.positions:
            newest = await self.redis.xrevrange(key, count=1)
            start = as_text(newest[0][0]) if newest else "0-0"
        sub = Subscription(key, asyncio.Queue(self.queue_max))
        # No await from here on: the reader sees the key and the follower together.
        if key not in self.positions:
            self.positions[key] = start or "0-0"
            self._generation += 1
            self._wake()
        self.subs.setdefault(key, set()).add(sub)
        self._wanted.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        followers = self.subs.get(sub.key)
        if followers is None:
            return
        followers.discard(sub)
        if not followers:  # the reader leaves it out from its next read on
            del self.subs[sub.key]
            self.positions.pop(sub.key, None)

    def _drop(self, sub: Subscription, why: str) -> None:
        sub.dropped = why
        self.unsubscribe(sub)
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(None)  # wakes a follower waiting on an empty queue

    def drop_all(self, why: str) -> None:
        """End every follower now (each sends `why` as a comment and closes); the reader
        goes on, for streams opened later."""
        self._drop_all(why)

    def _drop_all(self, why: str) -> None:
        for followers in list(self.subs.values()):
            for sub in list(followers):
                self._drop(sub, why)

    # -- the reader -----------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._read_once()
            except (RedisError, OSError) as e:
                log.warning("event streams: Redis read failed (%s); followers reconnect", e)
                self._reader_id = None
                self._drop_all("redis unavailable, reconnect")
                await asyncio.sleep(1.0)

    async def _read_once(self) -> None:
        if not self.positions:
            self._wanted.clear()
            await self._wanted.wait()
            return
        if self._reader_id is None:
            self._reader_id = int(await self.reader.client_id())
        self._read_generation = self._generation
        answer = await self.reader.xread(dict(self.positions), count=self.count,
                                         block=self.block_ms)
        for key, entries in answer or []:
            self._fan_out(as_text(key), entries)

    def _fan_out(self, key: str, entries: list[Any]) -> None:
        if key not in self.positions:
            return  # nobody follows it any more
        position = entry_order(self.positions[key])
        for raw_id, fields in entries:
            entry_id = as_text(raw_id)
            order = entry_order(entry_id)
            if order <= position:  # read for an earlier follower of a key re-followed since
                continue
            position = order
            self.positions[key] = entry_id
            event = decode_entry(fields)
            for sub in list(self.subs.get(key, ())):
                try:
                    sub.queue.put_nowait((entry_id, event))
                except asyncio.QueueFull:
                    self._drop(sub, "this client reads too slowly, reconnect")

    def _wake(self) -> None:
        """Make the blocked XREAD return, so that it reads the new key too."""
        if self._waker is None or self._waker.done():
            self._waker = asyncio.create_task(self._wake_until_read())

    async def _wake_until_read(self) -> None:
        # CLIENT UNBLOCK is a no-op if it arrives just before the XREAD it should end:
        # repeat (briefly) until the reader has started a read that includes every key.
        for _ in range(200):
            if self._read_generation >= self._generation or self._closing:
                return
            if self._reader_id is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.client_unblock(self._reader_id)
            await asyncio.sleep(0.01)
