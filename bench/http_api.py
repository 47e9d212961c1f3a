"""Load check of the HTTP API: submits/s and SSE connections held by one `sandqueue serve`
process, side by side with the Python client's submit rate on the same Redis.

    python -m bench.http_api [--tasks 1000] [--threads 16] [--streams 300]

Starts its own redis-server and `serve` (one process) on free loopback ports; no worker runs,
so only submitting and streaming are measured. Streams: every one must receive its task's
`queued` event and then a heartbeat, and all are held open at once while the Redis
connections of the `serve` process (and Redis's blocked clients) are counted. Timings on a shared
machine are noisy: compare the rates of one run with each other, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from producer.api import Client
from sandqueue.localredis import free_port, start_redis
from sandqueue.settings import Settings


def start_serve(redis_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "SANDQUEUE_API_HEARTBEAT_S": "1",
           "SANDQUEUE_API_SUBMIT_RATE_PER_MIN": "1000000", "SANDQUEUE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "serve", "--port", str(port)],
                            env=env, cwd=workdir, stdout=(workdir / "serve.log").open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("serve did not become ready")


def python_client_rate(redis_url: str, n: int) -> float:
    client = Client(Settings(_env_file=None, redis_url=redis_url))  # type: ignore[call-arg]
    client.submit("warm up")
    t0 = time.perf_counter()
    for i in range(n):
        client.submit(f"bench task {i}", labels={"tenant": "bench"})
    return n / (time.perf_counter() - t0)


def http_rate(url: str, key: str, n: int, threads: int) -> tuple[float, list[str]]:
    headers = {"Authorization": f"Bearer {key}"}
    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def worker(count: int) -> list[str]:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            out = []
            for i in range(count):
                answer = c.post("/v1/tasks", json={"prompt": f"bench http {i}"})
                answer.raise_for_status()
                out.append(answer.json()["id"])
            return out

    worker(1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        ids = [t for part in pool.map(worker, per) for t in part]
    return n / (time.perf_counter() - t0), ids


async def hold_streams(url: str, key: str, task_ids: list[str],
                       measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Open one stream per task; each must get its `queued` event, then a heartbeat. With
    all of them held open at once, `measure` what the process holds of Redis."""
    limits = httpx.Limits(max_connections=len(task_ids) + 10)
    held, failed = 0, 0
    all_in, release = asyncio.Event(), asyncio.Event()

    def settle() -> None:
        if held + failed == len(task_ids):
            all_in.set()

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as c:

        async def one(task_id: str) -> bool:
            nonlocal held, failed
            got_event = False
            try:
                async with c.stream("GET", f"/v1/tasks/{task_id}/events") as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and json.loads(line[5:])["phase"] == "queued":
                            got_event = True
                        elif line.startswith(": heartbeat") and got_event:
                            held += 1
                            settle()
                            await release.wait()  # held open until measured
                            return True
            except Exception:
                failed += 1
                settle()
                raise
            failed += 1
            settle()
            return False

        t0 = time.perf_counter()
        streams = asyncio.gather(*(one(t) for t in task_ids), return_exceptions=True)
        await asyncio.wait_for(all_in.wait(), 300)
        all_held_after_s = round(time.perf_counter() - t0, 2)
        measured = measure()
        release.set()
        results = await streams
        return {"streams": len(task_ids), "held": sum(h is True for h in results),
                "errors": sorted({type(h).__name__ for h in results
                                  if isinstance(h, Exception)}),
                "all_held_after_s": all_held_after_s, **measured}


def redis_use(serve_pid: int, redis_url: str, redis_port: int) -> dict[str, Any]:
    """What the `serve` process holds of Redis: its TCP connections to it, and how many
    clients Redis has blocked (each stream used to block one connection in XREAD)."""
    from redis import Redis

    conns = [c for c in psutil.Process(serve_pid).net_connections(kind="tcp")
             if c.raddr and c.raddr.port == redis_port and c.status == "ESTABLISHED"]
    client = Redis.from_url(redis_url)
    try:
        blocked = int(client.info("clients")["blocked_clients"])
    finally:
        client.close()
    return {"serve_redis_connections": len(conns), "redis_blocked_clients": blocked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--streams", type=int, default=300)
    args = parser.parse_args(argv)
    redis = start_redis()
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-http-"))
    proc, url = start_serve(redis.url, workdir)
    try:
        from redis import Redis

        from producer.apikeys import ApiKeys

        _, key, _ = ApiKeys(Redis.from_url(redis.url)).create("bench")
        py_rate = python_client_rate(redis.url, args.tasks)
        rate, ids = http_rate(url, key, args.tasks, args.threads)
        # The submit burst left idle connections in serve's pools: count them apart.
        before = redis_use(proc.pid, redis.url, redis.port)["serve_redis_connections"]
        streams = asyncio.run(hold_streams(url, key, ids[:args.streams],
                                           lambda: redis_use(proc.pid, redis.url, redis.port)))
        report = {"python_client_submits_per_s": round(py_rate, 1),
                  "http_submits_per_s": round(rate, 1), "http_threads": args.threads,
                  "tasks": args.tasks, "serve_redis_connections_before_streams": before,
                  **streams}
        print(json.dumps(report, indent=2))
        print(f"serve log: {workdir / 'serve.log'}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(15)
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
