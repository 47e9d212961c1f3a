"""Start a throwaway Redis on loopback for the demo, tests and benchmarks.

Prefers Debian's `redis-server` on a free port; when there is none (and the caller allows
it) falls back to fakeredis' embedded TCP server, which speaks enough of the protocol (Lua
included, which Celery's Redis transport needs) for a first run, only slower.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRedis:
    url: str
    port: int
    kind: str  # "redis-server" or "fakeredis"
    _proc: subprocess.Popen[bytes] | None = None
    _server: Any = None
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._dir is not None:
            self._dir.cleanup()

    def restart(self) -> None:
        """Stop and start redis-server again on the same port and data (AOF kept)."""
        if self._proc is None:
            raise RuntimeError("restart needs a real redis-server")
        args = self._proc.args
        self._proc.terminate()
        self._proc.wait(10)
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ready(self.url)


def _wait_ready(url: str, timeout_s: float = 10.0) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            client.close()


def start_redis(*, allow_fake: bool = False, appendonly: bool = False) -> LocalRedis:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary:
        workdir = tempfile.TemporaryDirectory(prefix="sandqueue-redis-")
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--dir", workdir.name, "--appendonly", "yes" if appendonly else "no",
                "--protected-mode", "yes"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        local = LocalRedis(f"redis://127.0.0.1:{port}/0", port, "redis-server", proc, None,
                           workdir)
        try:
            _wait_ready(local.url)
        except Exception:
            local.stop()
            raise
        return local
    if not allow_fake:
        raise FileNotFoundError(
            "redis-server is not installed; install it (Debian: apt-get install redis-server) "
            "or set REDIS_URL to a running Redis"
        )
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
    local = LocalRedis(f"redis://127.0.0.1:{port}/0", port, "fakeredis", None, server)
    _wait_ready(local.url)
    return local

