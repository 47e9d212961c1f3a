"""How long the dashboard's task table takes with many tasks in Redis: it is paged, so the
time should not grow with the number of tasks.

    python -m bench.dashboard [--tasks 10000] [--tenants 3] [--repeat 20]

Starts its own redis-server and one `sandqueue serve`; submits the tasks (no worker, so they
stay queued) for one tenant and, for the admin's all-tenant view, spread over several;
then times `GET /` through a logged-in client: one tenant's newest page, an older page (by
cursor), a filtered page, and the admin's all-tenant view. Prints the median and worst time per
page and the Redis commands one page costs (from INFO commandstats).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.http_api import start_serve
from producer.api import Client
from sandqueue.contract import AgentTask
from sandqueue.localredis import start_redis
from sandqueue.settings import Settings


def _key(redis_url: str, tenant: str, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "producer.cli", "apikey", "create", "--tenant",
                          tenant, "--json", *extra], capture_output=True, text=True, check=True,
                         env={"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"})
    key: str = json.loads(out.stdout)["key"]
    return key


def _time(client: httpx.Client, path: str, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        answer = client.get(path)
        times.append(time.perf_counter() - t0)
        assert answer.status_code == 200, answer.text[:300]
    return statistics.median(times), max(times)


def _commands(r: redis.Redis, client: httpx.Client, path: str) -> int:
    r.config_resetstat()
    client.get(path)
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",
                                                                       "cmdstat_config|resetstat"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    local = start_redis()
    workdir = Path(tempfile.mkdtemp(prefix="sq-bench-dash-"))
    proc, url = start_serve(local.url, workdir)
    try:
        client = Client(Settings(_env_file=None, redis_url=local.url))  # type: ignore[call-arg]
        tenants = ["acme"] + [f"tenant{i}" for i in range(1, args.tenants)]
        client.submit_many([AgentTask(prompt=f"task {i}", labels={"tenant": "acme"})
                            for i in range(args.tasks)])
        for tenant in tenants[1:]:
            client.submit_many([AgentTask(prompt=f"{tenant} {i}", labels={"tenant": tenant})
                                for i in range(args.tasks // 10)])
        for tenant in tenants[1:]:
            _key(local.url, tenant)  # the admin's view lists the tenants of the API keys
        r = redis.Redis.from_url(local.url)
        rows = []
        for who, extra in (("acme", ()), ("ops", ("--scopes", "admin"))):
            with httpx.Client(base_url=url, timeout=60) as web:
                web.post("/login", data={"api_key": _key(local.url, who, *extra)})
                first = web.get("/").text
                older = re.search(r'href="(/\?[^"]*cursor=[^"]+)" id="older"', first)
                paths = {"newest page": "/", "filtered (status=queued)": "/?status=queued"}
                if older:
                    paths["older page (cursor)"] = older.group(1).replace("&amp;", "&")
                for name, path in paths.items():
                    median, worst = _time(web, path, args.repeat)
                    rows.append((who, name, median, worst, _commands(r, web, path)))
        print(f"{args.tasks} tasks of tenant acme, {args.tasks // 10} of each of "
              f"{args.tenants - 1} other tenant(s); GET / through one serve process\n")
        print("| viewer | page | median ms | worst ms | Redis commands |")
        print("| --- | --- | ---: | ---: | ---: |")
        for who, name, median, worst, commands in rows:
            print(f"| {who} | {name} | {median * 1000:.1f} | {worst * 1000:.1f} | {commands} |")
    finally:
        proc.terminate()
        proc.wait(10)
        local.stop()


if __name__ == "__main__":
    main()
