"""A real `sandqueue serve` process for the HTTP API's integration tests, and helpers to talk
to it: keys made with the real CLI, SSE frames read off the wire."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandqueue.localredis import free_port
from tests.integration.conftest import product_env, run_cli

SERVER_READY_TIMEOUT_S = 30.0


@dataclass
class ApiServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(redis_url: str, workdir: Path,
                 env: dict[str, str | None] | None = None) -> ApiServer:
    """`python -m producer.cli serve` on a free loopback port, ready when /healthz answers."""
    port = free_port()
    log_path = workdir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], env=product_env(redis_url, env), cwd=workdir,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = ApiServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"serve not ready after {SERVER_READY_TIMEOUT_S:.0f}s:\n{server.log()}")
        time.sleep(0.1)


def serve_fixture(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
                  env: dict[str, str | None] | None = None) -> Iterator[ApiServer]:
    server = start_server(redis_url, tmp_path_factory.mktemp("serve"), env)
    yield server
    server.stop()


def make_key(redis_url: str, tenant: str, *args: str) -> dict[str, Any]:
    """`sandqueue apikey create --json`, through the real CLI: the record plus `key`."""
    done = run_cli(redis_url, "apikey", "create", "--tenant", tenant, "--json", *args)
    assert done.code == 0, done.err
    created: dict[str, Any] = json.loads(done.out)
    return created


@dataclass
class Frame:
    id: str | None
    data: dict[str, Any]


def sse_frames(response: httpx.Response) -> Iterator[Frame]:
    """Events of an SSE response as they arrive (comments and `retry:` skipped)."""
    entry_id: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield Frame(entry_id, json.loads("\n".join(data)))
            entry_id, data = None, []
        elif line.startswith("id:"):
            entry_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())

