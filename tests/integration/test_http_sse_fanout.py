"""One Redis reader for every event stream of a `serve` process (`producer/http/fanout.py`).

Through a real `serve` and redis-server: 200 concurrent SSE streams hold a handful of Redis
connections (one blocked client), and every stream gets each of its events exactly once, in
order, live. On the hub itself (real redis-server, no HTTP): a follower that joins a stream
already followed gets its backlog from its own Last-Event-ID and then the live entries, with
no gap and no duplicate; a follower that reads too slowly is dropped, the others are not
held up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from producer.http import sse
from producer.http.fanout import CLIENT_NAME, StreamHub
from sandqueue import keys
from sandqueue.events import EventLog
from tests.integration.conftest import RestartableRedis
from tests.integration.http_server import ApiServer, make_key, serve_fixture

STREAMS = 200


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory,
                             env={"SANDQUEUE_API_HEARTBEAT_S": "60"})


def sse_client_count(rdb: redis.Redis) -> int:
    return sum(1 for c in rdb.client_list() if c.get("name") == CLIENT_NAME)


def publish(rdb: redis.Redis, task_id: str, event: dict[str, Any]) -> None:
    rdb.xadd(keys.events(task_id), EventLog.entry(event))


async def follow(url: str, key: str, task_id: str, opened: asyncio.Queue[str],
                 ) -> list[tuple[str | None, dict[str, Any]]]:
    """One SSE client: every (id, event) until the result event."""
    frames: list[tuple[str | None, dict[str, Any]]] = []
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as c, \
            c.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        assert response.status_code == 200, await response.aread()
        entry_id = None
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                entry_id = line[3:].strip()
            elif line.startswith("data:"):
                frames.append((entry_id, json.loads(line[5:])))
                entry_id = None
                if len(frames) == 1:
                    await opened.put(task_id)
                if frames[-1][1]["phase"] == "result":
                    return frames
    return frames


def test_200_streams_share_a_handful_of_redis_connections_and_get_every_event_once(
        server: ApiServer, redis_url: str, rdb: redis.Redis) -> None:
    key = make_key(redis_url, "acme")["key"]
    # Given 200 queued tasks (no worker runs them)
    with server.client(key) as c:
        posted = c.post("/v1/batches", json=[{"prompt": f"n{i}"} for i in range(STREAMS)])
        assert posted.status_code == 202, posted.text
        listed = c.get("/v1/tasks", params={"batch": posted.json()["id"], "limit": STREAMS})
        task_ids = [t["id"] for t in listed.json()["items"]]
    assert len(task_ids) == STREAMS
    measured: dict[str, int] = {}

    async def scenario() -> list[list[tuple[str | None, dict[str, Any]]]]:
        opened: asyncio.Queue[str] = asyncio.Queue()
        # When 200 clients follow them at once
        followers = [asyncio.create_task(follow(server.url, key, t, opened)) for t in task_ids]
        for _ in task_ids:
            await asyncio.wait_for(opened.get(), 120)  # each has its `queued` event
        # Then the process holds them with a handful of connections, one of them blocked
        measured["sse_connections"] = sse_client_count(rdb)
        measured["blocked_clients"] = int(rdb.info("clients")["blocked_clients"])
        measured["connected_clients"] = int(rdb.info("clients")["connected_clients"])
        # And live events reach every stream, interleaved across streams
        for step in range(3):
            for task_id in task_ids:
                publish(rdb, task_id, {"phase": "progress", "step": step})
        for task_id in task_ids:
            publish(rdb, task_id, {"phase": "result", "status": "succeeded", "error": None})
        return await asyncio.wait_for(asyncio.gather(*followers), 180)

    streams = asyncio.run(scenario())
    assert measured["sse_connections"] <= 9, measured  # one reader and its small pool
    assert measured["blocked_clients"] <= 1, measured  # was one blocked XREAD per stream
    assert measured["connected_clients"] < STREAMS // 2, measured
    for task_id, frames in zip(task_ids, streams, strict=True):
        stored = [i.decode() for i, _ in rdb.xrange(keys.events(task_id))]
        assert [entry_id for entry_id, _ in frames] == stored  # each once, in order
        assert [e.get("step", e["phase"]) for _, e in frames] == [
            "queued", 0, 1, 2, "result"]
    print(f"\n{STREAMS} streams: {measured}")


# -- the hub itself -------------------------------------------------------------------------

async def collect(frames: Any) -> list[tuple[str | None, dict[str, Any]]]:
    out: list[tuple[str | None, dict[str, Any]]] = []
    async for chunk in frames:
        for block in chunk.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines()
                         if line.startswith(("id: ", "data: ")))
            if "data" in lines:
                out.append((lines.get("id"), json.loads(lines["data"])))
    return out


def test_a_new_follower_of_a_followed_stream_gets_its_backlog_then_live_without_gaps(
        redis_url: str, rdb: redis.Redis) -> None:
    task_id = "joined-late"

    async def no_result() -> dict[str, Any] | None:
        return None

    async def scenario() -> tuple[list[Any], list[Any], str]:
        hub = StreamHub(redis_url)
        hub.start()
        writer = aioredis.Redis.from_url(redis_url)
        try:
            async def add(n: int) -> str:
                phase = "result" if n == 60 else "progress"
                raw = await writer.xadd(keys.events(task_id),
                                        EventLog.entry({"phase": phase, "n": n}))
                return str(raw.decode())

            ids = [await add(n) for n in range(10)]
            # Given a follower from the start, live
            first = asyncio.create_task(collect(sse.task_events(hub, task_id, "0-0", 30,
                                                                no_result)))
            await asyncio.sleep(0)
            # When a second one joins with Last-Event-ID = entry 3 while entries keep coming
            second = asyncio.create_task(collect(sse.task_events(hub, task_id, ids[3], 30,
                                                                 no_result)))
            for n in range(10, 61):
                await add(n)
                if n % 7 == 0:
                    await asyncio.sleep(0.001)
            return await asyncio.wait_for(first, 60), await asyncio.wait_for(second, 60), \
                ids[3]
        finally:
            await hub.close()
            await writer.aclose()

    first, second, after = asyncio.run(scenario())
    # Then each gets every entry once, in order, from where it started
    stored = [i.decode() for i, _ in rdb.xrange(keys.events(task_id))]
    assert [i for i, _ in first] == stored
    assert [e["n"] for _, e in first] == list(range(61))
    assert [i for i, _ in second] == stored[stored.index(after) + 1:]
    assert [e["n"] for _, e in second] == list(range(4, 61))


def test_a_slow_follower_is_dropped_and_does_not_hold_up_the_others(
        redis_url: str, rdb: redis.Redis) -> None:
    key = keys.events("busy")

    async def scenario() -> tuple[list[int], Any, int]:
        hub = StreamHub(redis_url, queue_max=5, count=2)
        hub.start()
        try:
            fast, slow = await hub.subscribe(key), await hub.subscribe(key)
            got: list[int] = []
            for n in range(30):
                rdb.xadd(key, EventLog.entry({"phase": "progress", "n": n}))

            async def read_fast() -> None:  # only the fast one is read
                while len(got) < 30:
                    item = await fast.queue.get()
                    assert item is not None
                    got.append(item[1]["n"])

            await asyncio.wait_for(read_fast(), 30)
            assert fast.dropped is None
            return got, slow, slow.queue.qsize()
        finally:
            await hub.close()

    got, slow, held = asyncio.run(scenario())
    assert got == list(range(30))
    assert slow.dropped and "too slowly" in slow.dropped
    assert held == 5  # what it had: it sends that, then ends; its client resumes from there


def test_the_hub_ends_its_followers_when_it_closes(redis_url: str) -> None:
    async def scenario() -> Any:
        hub = StreamHub(redis_url)
        hub.start()
        sub = await hub.subscribe(keys.events("never"))
        await hub.close()
        return sub, await asyncio.wait_for(sub.queue.get(), 5)

    sub, item = asyncio.run(scenario())
    assert item is None and sub.dropped == "the server is shutting down"


def test_when_redis_goes_away_followers_are_dropped_and_the_hub_recovers(
        aof_redis: RestartableRedis) -> None:
    key = keys.events("outage")

    async def scenario() -> tuple[Any, Any, int]:
        hub = StreamHub(aof_redis.url)
        hub.start()
        try:
            before = await hub.subscribe(key)
            await asyncio.sleep(0.2)  # the reader is blocked on it
            # When Redis goes down, Then the follower is told to reconnect
            await asyncio.to_thread(aof_redis.down)
            dropped = await asyncio.wait_for(before.queue.get(), 60)
            await asyncio.to_thread(aof_redis.up)
            # And once it is back, a new follower gets live entries again
            after = await hub.subscribe(key)
            writer = aioredis.Redis.from_url(aof_redis.url)
            await writer.xadd(key, EventLog.entry({"phase": "progress", "n": 1}))
            await writer.aclose()
            item = await asyncio.wait_for(after.queue.get(), 60)
            return before, dropped, item[1]["n"] if item else -1
        finally:
            await hub.close()

    before, dropped, n = asyncio.run(scenario())
    assert dropped is None and before.dropped == "redis unavailable, reconnect"
    assert n == 1
