"""The `serve` process itself: it bounds the event streams it holds, and a SIGTERM ends it
promptly even while clients hold streams open (graceful shutdown, then exit 0)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import wait_until
from tests.integration.http_server import make_key, sse_frames, start_server


def test_streams_beyond_the_limit_get_503_and_a_slot_frees_when_one_ends(
        redis_url: str, tmp_path: Path) -> None:
    server = start_server(redis_url, tmp_path, env={"SANDQUEUE_API_MAX_STREAMS": "1"})
    try:
        with server.client(make_key(redis_url, "acme")["key"]) as c:
            task_id = c.post("/v1/tasks", json={"prompt": "nobody runs me"}).json()["id"]
            events = f"/v1/tasks/{task_id}/events"
            with c.stream("GET", events) as first:
                frames = sse_frames(first)  # kept: dropping the iterator closes the stream
                assert next(frames).data["phase"] == "queued"
                refused = c.get(events, timeout=10)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
                assert c.get(f"/v1/tasks/{task_id}/result", params={"wait": 5}) \
                    .status_code == 503
            # The first stream closed: its slot is free again.
            wait_until(lambda: c.get(f"/v1/tasks/{task_id}/result").status_code == 202,
                       timeout_s=30, what="the stream slot to be given back")
    finally:
        server.stop()


def test_sigterm_ends_serve_promptly_with_a_stream_open(redis_url: str, tmp_path: Path) -> None:
    server = start_server(redis_url, tmp_path)
    with server.client(make_key(redis_url, "acme")["key"]) as c:
        task_id = c.post("/v1/tasks", json={"prompt": "nobody runs me"}).json()["id"]
        batch = c.post("/v1/batches", json=[{"prompt": "nor me"}]).json()
        ended: list[str] = []

        def follow(path: str, opened: threading.Event) -> None:
            try:
                with c.stream("GET", path) as r:
                    for _ in sse_frames(r):
                        opened.set()
                ended.append("cleanly")
            except httpx.HTTPError as e:
                ended.append(repr(e))  # the server cut it off instead of ending it

        # A task's stream (fed by the shared reader) and a batch's (polled)
        readers = []
        for path in (f"/v1/tasks/{task_id}/events", batch["links"]["events"]):
            opened = threading.Event()
            readers.append(threading.Thread(target=follow, args=(path, opened), daemon=True))
            readers[-1].start()
            assert opened.wait(30), f"{path} did not open"
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(30)
        except Exception:
            server.stop()
            pytest.fail(f"serve did not stop on SIGTERM:\n{server.log()}")
        # uvicorn re-raises the signal once it has shut down, as a process should.
        assert code in (0, -signal.SIGTERM), server.log()
        assert "Application shutdown complete" in server.log()
        for reader in readers:
            reader.join(30)
            assert not reader.is_alive()
        # The stream was ended at the signal (the client reconnects elsewhere with
        # Last-Event-ID), not cancelled after uvicorn's grace with a traceback per stream.
        assert ended == ["cleanly", "cleanly"]
        assert "Exception in ASGI application" not in server.log(), server.log()
