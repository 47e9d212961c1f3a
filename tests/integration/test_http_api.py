"""The HTTP API through a real `sandqueue serve` process, a real redis-server and real sim
workers: submit, follow over SSE (and resume a dropped stream), long-poll, cancel, list."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from sandqueue import keys
from tests.integration.conftest import StartWorker, wait_until
from tests.integration.http_server import ApiServer, make_key, serve_fixture, sse_frames

ENDED = {"succeeded", "failed", "timed_out", "cancelled"}


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory)


@pytest.fixture
def acme(server: ApiServer, redis_url: str) -> Iterator[httpx.Client]:
    with server.client(make_key(redis_url, "acme")["key"]) as client:
        yield client


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    answer = client.post("/v1/tasks", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    created: dict[str, Any] = answer.json()
    return created


def stream_ids(rdb: redis.Redis, task_id: str) -> list[str]:
    return [i.decode() for i, _ in rdb.xrange(keys.events(task_id))]


def test_submit_follow_events_to_the_result_and_read_it(
        acme: httpx.Client, worker_factory: StartWorker, rdb: redis.Redis) -> None:
    # Given a worker, When a task is submitted over HTTP and its events are followed
    worker_factory(concurrency=2)
    task = submit(acme, {"prompt": "say hello", "labels": {"team": "web"}})
    assert task["status"] == "queued" and task["links"]["events"].endswith("/events")
    with acme.stream("GET", task["links"]["events"]) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = list(sse_frames(response))
    # Then the stream is the task's Redis Stream, entry for entry, ending with the result
    assert [f.id for f in frames] == stream_ids(rdb, task["id"])
    assert frames[0].data["phase"] == "queued"
    assert frames[-1].data == {**frames[-1].data, "phase": "result", "status": "succeeded"}
    # (the result event is published just before the result is stored: wait for it)
    result = acme.get(task["links"]["result"], params={"wait": 30}).json()
    assert result["status"] == "succeeded" and "say hello" in result["result"]
    assert result["labels"] == {"team": "web", "tenant": "acme"}
    view = acme.get(task["links"]["self"]).json()
    assert view["status"] == "succeeded" and view["tenant"] == "acme"
    assert view["result"]["task_id"] == task["id"]


def test_a_dropped_stream_resumes_after_last_event_id_without_loss_or_repeat(
        acme: httpx.Client, worker_factory: StartWorker, rdb: redis.Redis) -> None:
    worker_factory(concurrency=2)
    task = submit(acme, {"prompt": "count tool calls", "mcp": {}})
    # Given a client that read two events, then lost its connection
    with acme.stream("GET", task["links"]["events"]) as response:
        first: list[Any] = []
        for frame in sse_frames(response):
            first.append(frame)
            if len(first) == 2:
                break
    # When it reconnects with the last id it saw
    with acme.stream("GET", task["links"]["events"],
                     headers={"Last-Event-ID": first[-1].id}) as response:
        rest = list(sse_frames(response))
    # Then together they are the whole stream, once each, in order
    ids = [f.id for f in first + rest]
    assert ids == stream_ids(rdb, task["id"])
    assert rest[-1].data["phase"] == "result"
    # And an id this API never sent is refused, not taken for the start
    bad = acme.get(task["links"]["events"], headers={"Last-Event-ID": "nonsense"})
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"


def test_a_reconnect_after_the_result_event_is_told_the_stream_is_over(
        acme: httpx.Client, worker_factory: StartWorker, rdb: redis.Redis) -> None:
    # Given a client that read the whole stream, result event included
    worker_factory(concurrency=2)
    task = submit(acme, {"prompt": "over and out"})
    with acme.stream("GET", task["links"]["events"]) as response:
        frames = list(sse_frames(response))
    assert frames[-1].data["phase"] == "result"
    # When it reconnects with the result's id (EventSource does, after the server closes)
    # Then 204 (EventSource stops reconnecting), not the result a second time
    again = acme.get(task["links"]["events"], headers={"Last-Event-ID": frames[-1].id})
    assert again.status_code == 204 and again.content == b""
    # And so does one from an id past the end
    later = f"{int(frames[-1].id.split('-')[0]) + 1}-0"
    assert acme.get(task["links"]["events"],
                    headers={"Last-Event-ID": later}).status_code == 204
    # While a reconnect from an earlier event still gets the rest, once each
    with acme.stream("GET", task["links"]["events"],
                     headers={"Last-Event-ID": frames[-2].id}) as response:
        rest = list(sse_frames(response))
    assert [f.id for f in rest] == [frames[-1].id]


def test_long_poll_answers_when_the_task_ends(acme: httpx.Client, worker_factory: StartWorker,
                                              rdb: redis.Redis) -> None:
    # Given a queued task nobody runs yet, and a caller long-polling its result
    task = submit(acme, {"prompt": "wait for me"})
    assert acme.get(task["links"]["result"]).status_code == 202  # wait=0: not yet
    answers: list[httpx.Response] = []
    poll = threading.Thread(target=lambda: answers.append(
        acme.get(task["links"]["result"], params={"wait": 55}, timeout=120)))
    poll.start()
    # When a worker starts and runs it
    worker_factory(concurrency=1)
    poll.join(timeout=50)
    # Then the long-poll came back with the result, before its wait ran out
    assert not poll.is_alive(), "the long-poll did not return when the task ended"
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["status"] == "succeeded"


def test_cancel_a_queued_task_and_a_running_one(acme: httpx.Client, worker_factory: StartWorker,
                                               rdb: redis.Redis) -> None:
    # A queued task (no worker yet) is cancelled at once, and its long-poll returns.
    queued = submit(acme, {"prompt": "never run"})
    answer = acme.post(queued["links"]["cancel"])
    assert answer.status_code == 202 and answer.json()["outcome"] == "cancelled"
    assert acme.get(queued["links"]["result"], params={"wait": 30}).json()["status"] == \
        "cancelled"
    # A running task is stopped by its worker.
    worker_factory(concurrency=1, env={"SANDQUEUE_SIM_LATENCY_S": "60"})
    running = submit(acme, {"prompt": "run long"})
    wait_until(lambda: acme.get(running["links"]["self"]).json()["status"] == "running",
               timeout_s=30, what="the task to start")
    assert acme.post(running["links"]["cancel"]).json()["outcome"] == "requested"
    result = acme.get(running["links"]["result"], params={"wait": 55}, timeout=120)
    assert result.status_code == 200 and result.json()["status"] == "cancelled"
    # Cancelling an ended task says so.
    again = acme.post(running["links"]["cancel"]).json()
    assert again["outcome"] == "ended" and again["status"] == "cancelled"


def test_listing_pages_newest_first_with_filters(acme: httpx.Client, server: ApiServer,
                                                 redis_url: str) -> None:
    ids = [submit(acme, {"prompt": f"task {n}", "labels": {"n": str(n % 2)}})["id"]
           for n in range(5)]
    acme.post(f"/v1/tasks/{ids[0]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        page = acme.get("/v1/tasks", params={"limit": 2, **({"cursor": cursor} if cursor
                                                            else {})}).json()
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    assert [t["id"] for t in acme.get("/v1/tasks", params={"status": "cancelled"})
            .json()["items"]] == [ids[0]]
    assert [t["id"] for t in acme.get("/v1/tasks", params={"label": "n=1"}).json()["items"]] \
        == [ids[3], ids[1]]
    # Another tenant's listing does not show them.
    with server.client(make_key(redis_url, "other")["key"]) as other:
        assert other.get("/v1/tasks").json()["items"] == []
    assert acme.get("/v1/tasks", params={"cursor": "!!"}).status_code == 400


def test_idempotency_key_header_is_race_safe_and_per_tenant(
        acme: httpx.Client, server: ApiServer, redis_url: str) -> None:
    first = submit(acme, {"prompt": "once"}, **{"Idempotency-Key": "order-17"})
    again = submit(acme, {"prompt": "once"}, **{"Idempotency-Key": "order-17"})
    assert again["id"] == first["id"] and again["duplicate"] is True
    different = acme.post("/v1/tasks", json={"prompt": "another"},
                          headers={"Idempotency-Key": "order-17"})
    assert different.status_code == 409 and "idempotency key" in different.json()["detail"]
    # The same key from another tenant is another task, and reveals nothing of acme's.
    with server.client(make_key(redis_url, "globex")["key"]) as globex:
        theirs = submit(globex, {"prompt": "another"}, **{"Idempotency-Key": "order-17"})
    assert theirs["id"] != first["id"] and theirs["duplicate"] is False


def test_errors_are_problem_details(acme: httpx.Client) -> None:
    invalid = acme.post("/v1/tasks", json={"prompt": "x", "max_turns": 0, "bogus": 1})
    assert invalid.status_code == 422
    problem = invalid.json()
    assert invalid.headers["content-type"] == "application/problem+json"
    assert problem["category"] == "invalid_task" and problem["status"] == 422
    assert "max_turns" in problem["detail"] and "bogus" in problem["detail"]
    huge = acme.post("/v1/tasks", content=b'{"prompt": "' + b"a" * 2_000_000 + b'"}',
                     headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["category"] == "too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    chunked = acme.post("/v1/tasks", content=chunks(),
                        headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    missing = acme.get("/v1/tasks/no-such-task")
    assert missing.status_code == 404 and missing.json()["category"] == "not_found"


def test_health_openapi_and_docs(server: ApiServer) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json() == {"status": "ready"}
        schema = anonymous.get("/openapi.json").json()
        assert {"/v1/tasks", "/v1/tasks/{task_id}/events"} <= set(schema["paths"])
        assert anonymous.get("/docs").status_code == 200
