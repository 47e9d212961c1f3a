"""Typed answers and follow-up turns over HTTP, through a real `sandqueue serve` and workers:
`output_schema` is a body field like any other; `POST /v1/tasks/{id}/follow-up` continues a
task of the caller's own tenant, and another tenant's task is not known."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.http_server import ApiServer, make_key, serve_fixture

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact store for the server and the workers (a shared volume)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
           store_dir: Path) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory,
                             env={"SANDQUEUE_ARTIFACT_DIR": str(store_dir)})


def test_typed_answer_then_follow_up_within_the_tenant_only(
        server: ApiServer, redis_url: str, worker_factory: StartWorker, store_dir: Path) -> None:
    worker_factory(concurrency=2, env={"SANDQUEUE_ARTIFACT_DIR": str(store_dir)})
    with server.client(make_key(redis_url, "acme")["key"]) as acme, \
            server.client(make_key(redis_url, "globex")["key"]) as globex:
        first = acme.post("/v1/tasks", json={
            "prompt": "pick a number", "output_schema": SCHEMA,
            "envs": {"SIM_OUTPUT": json.dumps([{"n": 7}]), "SIM_LATENCY_S": "0.05"}}).json()
        result = acme.get(f"/v1/tasks/{first['id']}/result", params={"wait": 60}).json()
        assert result["status"] == "succeeded" and result["output"] == {"n": 7}

        # another tenant cannot continue it, by the route or by parent_id
        refused = globex.post(f"/v1/tasks/{first['id']}/follow-up", json={"prompt": "and?"})
        assert refused.status_code == 404
        refused = globex.post("/v1/tasks", json={"prompt": "and?", "parent_id": first["id"]})
        assert refused.status_code == 422
        assert f"no task {first['id']} is known" in refused.json()["detail"]

        second = acme.post(f"/v1/tasks/{first['id']}/follow-up",
                           json={"prompt": "and twice that?",
                                 "envs": {"SIM_LATENCY_S": "0.05"}})
        assert second.status_code == 202, second.text
        done = acme.get(f"/v1/tasks/{second.json()['id']}/result", params={"wait": 60}).json()
        assert done["status"] == "succeeded", done
        assert done["parent_id"] == first["id"]
        assert done["session_id"] == result["session_id"]
        assert f"resumed session {result['session_id']}, turn 2" in done["result"]


def test_a_follow_up_of_an_unfinished_task_is_refused(server: ApiServer,
                                                      redis_url: str) -> None:
    with server.client(make_key(redis_url, "acme")["key"]) as acme:
        queued = acme.post("/v1/tasks", json={"prompt": "no worker runs this"}).json()
        answer = acme.post(f"/v1/tasks/{queued['id']}/follow-up", json={"prompt": "next"})
        assert answer.status_code == 422
        assert "has not finished (queued)" in answer.json()["detail"]
        acme.post(f"/v1/tasks/{queued['id']}/cancel")


