"""Repositories in, artifacts out, through a real worker process, the real CLI, the Python
API and a batch: the repo's diff comes back identical to the one computed locally, and a
private repository's token is nowhere (Redis, results, artifacts, the sandbox's git config,
the worker's log)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sandqueue.artifacts import ArtifactDamaged
from tests.fakes.git_http import GitHttpServer
from tests.integration.conftest import (
    RunCli,
    StartWorker,
    assert_secret_absent,
    close_client,
    make_client,
)
from tests.unit.test_workspace import EDITS, local_diff, origin  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def store_env(tmp_path: Path, **extra: str) -> dict[str, str | None]:
    return {"SANDQUEUE_ARTIFACT_DIR": str(tmp_path / "artifact-store"), **extra}


def test_repo_to_diff_through_a_worker_and_the_cli(
        cli: RunCli, worker_factory: StartWorker, origin: dict[str, Any],  # noqa: F811
        tmp_path: Path) -> None:
    env = store_env(tmp_path)
    worker_factory(concurrency=2, env=env)
    brief = tmp_path / "brief.md"
    brief.write_text("# what to do\n")
    code, out, err = cli("submit", "fix the readme", "--repo", origin["url"], "--ref", "main",
                         "--file", f"{brief}:docs/brief.md", "--collect", "docs/*.md",
                         "--env", f"SIM_EDITS={json.dumps(EDITS)}", "--wait", "--json",
                         env=env)
    assert code == 0, err
    result = json.loads(out)
    assert result["repo_commit"] == origin["second"]
    assert {a["name"] for a in result["artifacts"]} == {"repo.diff", "files/docs/brief.md"}

    code, out, err = cli("artifacts", result["task_id"], "--out", str(tmp_path / "got"),
                         "--json", env=env)
    assert code == 0, err
    listed = json.loads(out)["artifacts"]
    assert {Path(a["downloaded_to"]).relative_to(tmp_path / "got").as_posix()
            for a in listed} == {"repo.diff", "files/docs/brief.md"}
    expected = local_diff(origin, tmp_path / "local", origin["second"],
                          {**EDITS, "docs/brief.md": "# what to do\n"})
    assert (tmp_path / "got/repo.diff").read_bytes() == expected
    assert (tmp_path / "got/files/docs/brief.md").read_text() == "# what to do\n"

    code, out, _ = cli("artifacts", result["task_id"], env=env)
    assert code == 0 and "repo.diff" in out and "files/docs/brief.md" in out


def test_artifacts_of_unknown_or_unfinished_tasks(cli: RunCli, tmp_path: Path) -> None:
    code, out, _ = cli("artifacts", "no-such-task", "--json", env=store_env(tmp_path))
    assert code == 2 and json.loads(out)["error"] == "unknown_task"
    code, out, _ = cli("submit", "queued, no worker", "--json", env=store_env(tmp_path))
    task_id = json.loads(out)["id"]
    code, out, _ = cli("artifacts", task_id, "--json", env=store_env(tmp_path))
    assert code == 4 and json.loads(out)["error"] == "not_finished"


def test_a_private_repo_token_is_nowhere_after_the_run(
        cli: RunCli, rdb: redis.Redis, worker_factory: StartWorker,
        origin: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    token = f"ghp_sqitrepo{uuid.uuid4().hex}"
    env = store_env(tmp_path)
    worker = worker_factory(concurrency=2, env={**env, "SQIT_REPO_TOKEN": token})
    with GitHttpServer(origin["root"], "x-access-token", token) as host:
        code, out, err = cli("submit", "change it", "--repo", f"{host.url}/repo.git",
                             "--repo-token", "${SQIT_REPO_TOKEN}", "--collect", ".git/config",
                             "--collect", "**/*", "--env",
                             f"SIM_EDITS={json.dumps(EDITS)}", "--wait", "--json", env=env)
    assert code == 0, err
    assert host.expected in host.auth_seen
    result = json.loads(out)
    header = host.expected.split()[1]
    for secret in (token, header):
        assert_secret_absent(rdb, secret)
        assert secret not in out and secret not in err and secret not in worker.log()
    code, _, err = cli("artifacts", result["task_id"], "--out", str(tmp_path / "got"), env=env)
    assert code == 0, err
    files = [p for p in (tmp_path / "got").rglob("*") if p.is_file()]
    assert tmp_path / "got/files/.git/config" in files and len(files) > 3
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data and header.encode() not in data
        assert base64.b64decode(header) not in data


def test_python_api_and_batch_lines_carry_the_artifacts(
        cli: RunCli, redis_url: str, worker_factory: StartWorker,
        origin: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    env = store_env(tmp_path)
    worker_factory(concurrency=4, env=env)
    client = make_client(redis_url, artifact_dir=env["SANDQUEUE_ARTIFACT_DIR"])
    try:
        handle = client.submit({"prompt": "edit", "repo": origin["url"],
                                "envs": {"SIM_EDITS": json.dumps({"README.md": "api\n"})}})
        assert handle.wait(timeout=60).ok
        (ref,) = handle.artifacts()
        assert ref.name == "repo.diff" and b"+api" in handle.read_artifact("repo.diff")
        (path,) = handle.download_artifacts(tmp_path / "api")
        assert path.read_bytes() == handle.read_artifact("repo.diff")
        # A copy changed in the store (same size) is refused, not handed back as the diff
        stored = Path(env["SANDQUEUE_ARTIFACT_DIR"]) / handle.id / "data" / "repo.diff"
        stored.write_bytes(stored.read_bytes().replace(b"+api", b"+APi"))
        with pytest.raises(ArtifactDamaged, match="sha256"):
            handle.read_artifact("repo.diff")
    finally:
        close_client(client)

    source = tmp_path / "inputs.jsonl"
    source.write_text("\n".join(json.dumps(
        {"id": ref, "prompt": "look", "repo": {"url": origin["url"], "ref": ref}})
        for ref in ("v1", "main")) + "\n")
    out = tmp_path / "results.jsonl"
    code, _, err = cli("batch", "run", str(source), "--out", str(out), "--no-progress",
                       "--collect", "README.md", env=env)
    assert code == 0, err
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    for key, commit in (("v1", "first"), ("main", "second")):
        assert lines[key]["repo_commit"] == origin[commit]
        assert {a["name"] for a in lines[key]["artifacts"]} == {"repo.diff",
                                                                "files/README.md"}


def test_http_lists_and_downloads_artifacts_for_their_tenant_only(
        redis_url: str, worker_factory: StartWorker, origin: dict[str, Any],  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from tests.integration.http_server import make_key, serve_fixture

    env = store_env(tmp_path)
    worker_factory(concurrency=2, env=env)
    served = serve_fixture(redis_url, tmp_path_factory, env)
    server = next(served)
    try:
        acme = server.client(make_key(redis_url, "acme")["key"])
        other = server.client(make_key(redis_url, "other")["key"])
        task = acme.post("/v1/tasks", json={
            "prompt": "edit", "repo": {"url": origin["url"], "ref": "v1"},
            "collect": ["*.md"], "envs": {"SIM_EDITS": json.dumps({"README.md": "web\n"})}})
        assert task.status_code == 202, task.text
        task_id = task.json()["id"]
        result = acme.get(f"/v1/tasks/{task_id}/result", params={"wait": 60}).json()
        assert result["status"] == "succeeded", result
        listed = acme.get(f"/v1/tasks/{task_id}/artifacts").json()
        assert [a["name"] for a in listed] == [a["name"] for a in result["artifacts"]]
        got = acme.get(f"/v1/tasks/{task_id}/artifacts/files/README.md")
        assert got.status_code == 200 and got.content == b"web\n"
        assert got.headers["etag"].strip('"') == next(
            a["sha256"] for a in listed if a["name"] == "files/README.md")
        diff = acme.get(f"/v1/tasks/{task_id}/artifacts/repo.diff")
        assert diff.status_code == 200 and b"+web" in diff.content
        # A copy changed in the store ends the body short of its Content-Length
        stored = Path(env["SANDQUEUE_ARTIFACT_DIR"]) / task_id / "data" / "repo.diff"
        stored.write_bytes(stored.read_bytes().replace(b"+web", b"+WEB"))
        with pytest.raises(httpx.RemoteProtocolError):
            acme.get(f"/v1/tasks/{task_id}/artifacts/repo.diff")
        # Another tenant, a name the result does not list, a token reference not allowed
        assert other.get(f"/v1/tasks/{task_id}/artifacts/repo.diff").status_code == 404
        assert other.get(f"/v1/tasks/{task_id}/artifacts").status_code == 404
        assert acme.get(f"/v1/tasks/{task_id}/artifacts/files/other.md").status_code == 404
        refused = acme.post("/v1/tasks", json={"prompt": "x", "repo": {
            "url": "https://example.com/r.git", "token": "${E2B_API_KEY}"}})
        assert refused.status_code == 422 and "E2B_API_KEY" in refused.text
        acme.close()
        other.close()
    finally:
        next(served, None)
