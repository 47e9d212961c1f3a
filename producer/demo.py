"""`sandqueue demo`: the whole flow on one machine, started and stopped for you.

Redis (a local `redis-server`, or an embedded fakeredis server when there is none) unless
REDIS_URL is set, one worker process, one example task followed live, its result printed.
Without E2B_API_KEY the sandbox and agent are simulated, and say so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from producer import render
from producer.api import Client
from sandqueue.contract import AgentResult, TaskStatus
from sandqueue.localredis import LocalRedis, start_redis
from sandqueue.settings import load_settings

DEFAULT_PROMPT = (
    "Use the fetch tool to read https://example.com and tell me, in one sentence, "
    "what the page says. Quote its title exactly, e.g. \"Example Domain\"."
)


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "worker", "--concurrency", "4",
         "--loglevel", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=None,
    )


def _follow(client: Client, task_id: str, timeout_s: float) -> AgentResult:
    handle = client.get(task_id)
    seen = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = handle.result()
        if outcome is not None:
            return outcome
        info = handle.info()
        state = info.get("status", "queued")
        line = state + (f" (attempt {info['attempt']})" if info.get("attempt") else "")
        if info.get("sandbox_id") and state == TaskStatus.RUNNING.value:
            line += f" in sandbox {info['sandbox_id']}"
        if line != seen:
            render.err.print(f"  {time.strftime('%H:%M:%S')} {line}")
            seen = line
        time.sleep(0.3)
    return handle.wait(timeout=1)


def run_demo(prompt: str | None, as_json: bool) -> int:
    local: LocalRedis | None = None
    worker: subprocess.Popen[bytes] | None = None
    # The worker's "running as root" notice is noise for a local demo.
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning:celery.platforms"}
    try:
        if not env.get("REDIS_URL"):
            local = start_redis(allow_fake=True)
            env["REDIS_URL"] = local.url
            note = "" if local.kind == "redis-server" else " (embedded fakeredis: slower)"
            render.err.print(f"started {local.kind} at {local.url}{note}")
        settings = load_settings(redis_url=env["REDIS_URL"])
        client = Client(settings)
        worker = _start_worker(env)
        render.err.print(f"started a worker (pid {worker.pid}, provider {settings.provider})")
        fields: dict[str, object] = {"mcp": {"fetch": {}}, "labels": {"source": "demo"},
                                     "timeout_s": min(600.0, settings.max_timeout_s)}
        if settings.provider == "sim":
            fields["envs"] = {"SIM_TOOL_CALLS": "2", "SIM_LATENCY_S": "1.5"}
        handle = client.submit(prompt or DEFAULT_PROMPT, **fields)
        render.err.print(f"submitted task {handle.id}")
        result = _follow(client, handle.id, timeout_s=660)
        if as_json:
            render.print_json(result.model_dump(mode="json"))
        else:
            render.print_result(result)
        return 0 if result.ok else 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if local is not None:
            local.stop()
