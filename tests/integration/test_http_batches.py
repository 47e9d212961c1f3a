"""Batches over HTTP through a real `sandqueue serve`, workers and redis-server: the results
are the CLI's results file for the same input; posting again resumes; progress over SSE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import RunCli, StartWorker
from tests.integration.http_server import ApiServer, make_key, serve_fixture, sse_frames

JSONL = "\n".join([
    json.dumps({"id": "alpha", "prompt": "first input"}),
    "",
    json.dumps({"prompt": "second input", "labels": {"kind": "plain"}}),
    json.dumps({"id": "gamma", "prompt": "third input", "max_turns": 3}),
    json.dumps({"prompt": "fourth input"}),
]) + "\n"
VOLATILE = {"task_id", "timings", "session_id", "finished_at", "sandbox_id", "labels",
            "attempt_log", "transcript"}


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory)


@pytest.fixture
def acme(server: ApiServer, redis_url: str) -> Iterator[httpx.Client]:
    with server.client(make_key(redis_url, "acme")["key"]) as client:
        yield client


def comparable(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(({k: v for k, v in line.items() if k not in VOLATILE} for line in lines),
                  key=lambda line: line["id"])


def test_a_jsonl_batch_gives_the_clis_results_file(
        acme: httpx.Client, worker_factory: StartWorker, cli: RunCli, tmp_path: Path) -> None:
    worker_factory(concurrency=4)
    # Given the same JSONL through the CLI and over HTTP
    source = tmp_path / "in.jsonl"
    source.write_text(JSONL)
    out = tmp_path / "cli.jsonl"
    done = cli("batch", "run", str(source), "--out", str(out), "--json", "--no-progress")
    assert done.code == 0, done.err
    posted = acme.post("/v1/batches", content=JSONL,
                       headers={"content-type": "application/x-ndjson"})
    assert posted.status_code == 202, posted.text
    batch = posted.json()
    assert batch["total"] == 4 and batch["submitted"] == 4
    # When its progress is followed to the end
    with acme.stream("GET", batch["links"]["events"]) as response:
        events = [f.data for f in sse_frames(response)]
    assert events[-1]["phase"] == "done" and events[-1]["by_status"]["succeeded"] == 4
    # Then its results, in input order, are the CLI's lines
    lines = [json.loads(x) for x in acme.get(batch["links"]["results"]).text.splitlines()]
    assert [x["id"] for x in lines] == ["alpha", "line-3", "gamma", "line-5"]
    assert all(x["labels"]["tenant"] == "acme" for x in lines)
    cli_lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert comparable(lines) == comparable(cli_lines)
    # And posting it again resumes it: the same batch, nothing submitted twice
    again = acme.post("/v1/batches", content=JSONL,
                      headers={"content-type": "application/x-ndjson"}).json()
    assert again["id"] == batch["id"] and again["submitted"] == 0
    assert acme.get(batch["links"]["self"]).json()["by_status"] == {"succeeded": 4,
                                                                   "unsubmitted": 0}
    # With numbers as numbers (a TypeScript client adds to them), here and in the events
    view = acme.get(batch["links"]["self"]).json()
    assert view["total"] == 4 and isinstance(view["created_at"], float)
    assert events[-1]["total"] == 4 and isinstance(events[-1]["created_at"], float)
    # And a batch whose every task ended says so (nobody follows an HTTP batch to mark it)
    assert view["status"] == "done" and events[-1]["status"] == "done"


def test_a_json_array_batch_with_defaults_and_a_bad_line(acme: httpx.Client) -> None:
    bad = acme.post("/v1/batches", json=[{"prompt": "fine"}, {"prompt": ""},
                                         {"prompt": "x", "labels": {"tenant": "evil"}}])
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    assert "line 2" in detail and "line 3" in detail and "labels.tenant" in detail
    posted = acme.post("/v1/batches", json={"tasks": [{"prompt": "cats"}, {"prompt": "dogs"}],
                                            "defaults": {"labels": {"run": "7"}}})
    assert posted.status_code == 202, posted.text
    listed = acme.get("/v1/tasks", params={"batch": posted.json()["id"]}).json()["items"]
    assert sorted(t["labels"]["run"] for t in listed) == ["7", "7"]
    cancelled = acme.post(posted.json()["links"]["cancel"]).json()
    assert cancelled["cancelled"] == 2


def test_another_tenants_batch_is_404(acme: httpx.Client, server: ApiServer,
                                      redis_url: str) -> None:
    batch = acme.post("/v1/batches", json=[{"prompt": "mine"}]).json()
    with server.client(make_key(redis_url, "globex")["key"]) as globex:
        for method, path in [("GET", batch["links"]["self"]), ("GET", batch["links"]["results"]),
                             ("GET", batch["links"]["events"]),
                             ("POST", batch["links"]["cancel"])]:
            assert globex.request(method, path).status_code == 404, path
    acme.post(batch["links"]["cancel"])
