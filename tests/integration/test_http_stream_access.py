"""Open streams end when their access does: a revoked API key's /v1 event stream and a
logged-out dashboard session's live stream stop within a heartbeat or two (a quiet stream
sends one every SANDQUEUE_API_HEARTBEAT_S, 0.5 s here), instead of running on until the
task ends or for ever."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import run_cli
from tests.integration.http_server import ApiServer, make_key, serve_fixture

pytestmark = pytest.mark.integration
ENDED = ": access ended"


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory,
                             env={"SANDQUEUE_API_HEARTBEAT_S": "0.5"})


def read_until_closed(response: httpx.Response, act: object, limit_s: float = 30.0
                      ) -> tuple[list[str], float]:
    """Lines of a stream until the server closes it; `act()` runs after the first line.
    Returns the lines and how long after `act` the stream ended."""
    lines: list[str] = []
    acted_at = None
    for line in response.iter_lines():
        lines.append(line)
        if acted_at is None:
            act()  # type: ignore[operator]
            acted_at = time.monotonic()
        assert time.monotonic() - acted_at < limit_s, "the stream went on after access ended"
    assert acted_at is not None
    return lines, time.monotonic() - acted_at


def test_revoking_a_key_ends_its_open_event_streams(server: ApiServer, redis_url: str) -> None:
    made = make_key(redis_url, "acme")
    with server.client(made["key"]) as api:
        task_id = api.post("/v1/tasks", json={"prompt": "no worker: stays queued"}).json()["id"]
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            assert response.status_code == 200
            lines, after_s = read_until_closed(
                response, lambda: run_cli(redis_url, "apikey", "revoke", made["id"]))
        assert any(line.startswith(ENDED) for line in lines), lines[-5:]
        print(f"\nstream ended {after_s:.2f}s after the revoke")
        assert api.get(f"/v1/tasks/{task_id}/events").status_code == 401  # and the reconnect


def test_logging_out_ends_the_sessions_live_streams(server: ApiServer, redis_url: str) -> None:
    key = make_key(redis_url, "acme")["key"]
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        assert browser.post("/login", data={"api_key": key}).status_code == 303
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', browser.get("/").text)
        assert csrf is not None
        with httpx.Client(base_url=server.url, timeout=30,
                          cookies=browser.cookies) as tab, tab.stream(
                "GET", "/live/tasks", params={"newer_than": time.time()}) as live:
            assert live.status_code == 200
            lines, _ = read_until_closed(
                live, lambda: browser.post("/logout", data={"csrf": csrf.group(1)}))
        assert any(line.startswith(ENDED) for line in lines), lines[-5:]
