"""Who may do what over HTTP: API keys (401), scopes (403), tenant isolation (404), the
tenant label and `${NAME}` allow-list at submit (422), the submit rate limit (429), and
what Redis keeps of a key (its hash only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.integration.conftest import dump_redis, run_cli, wait_until
from tests.integration.http_server import ApiServer, make_key, serve_fixture, sse_frames

GITHUB = {"githubOfficial": {"githubPersonalAccessToken": "${GITHUB_TOKEN}"}}


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory)


def task_routes(task_id: str) -> list[tuple[str, str]]:
    base = f"/v1/tasks/{task_id}"
    return [("GET", base), ("GET", f"{base}/result"), ("GET", f"{base}/events"),
            ("POST", f"{base}/cancel")]


ALL_ROUTES = [("POST", "/v1/tasks"), ("GET", "/v1/tasks"), *task_routes("some-id")]


def call(client: httpx.Client, method: str, path: str) -> httpx.Response:
    body: dict[str, Any] | None = {"prompt": "hi"} if method == "POST" else None
    return client.request(method, path, json=body)


def test_no_wrong_revoked_or_expired_key_is_401_on_every_route(
        server: ApiServer, redis_url: str) -> None:
    good = make_key(redis_url, "acme")
    revoked = make_key(redis_url, "acme")
    assert run_cli(redis_url, "apikey", "revoke", revoked["id"]).code == 0
    expiring = make_key(redis_url, "acme", "--expires", "0.00003")  # ~2.6 s
    forged = good["key"][:-4] + ("AAAA" if not good["key"].endswith("AAAA") else "BBBB")
    with server.client(expiring["key"]) as c:
        assert c.get("/v1/tasks").status_code == 200  # works until it expires
        wait_until(lambda: c.get("/v1/tasks").status_code == 401, timeout_s=30,
                   what="the key to expire")
    for key in (None, "nonsense", forged, revoked["key"], expiring["key"]):
        with server.client(key) as c:
            for method, path in ALL_ROUTES:
                answer = call(c, method, path)
                assert answer.status_code == 401, (key, method, path, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer"
                assert answer.json()["category"] == "auth"
    with server.client(revoked["key"]) as c:
        assert "revoked" in c.get("/v1/tasks").json()["detail"]


def test_missing_scope_is_403(server: ApiServer, redis_url: str) -> None:
    owner = make_key(redis_url, "acme")
    reader = make_key(redis_url, "acme", "--scopes", "read")
    with server.client(owner["key"]) as c:
        task_id = c.post("/v1/tasks", json={"prompt": "hi"}).json()["id"]
    with server.client(reader["key"]) as c:
        assert c.post("/v1/tasks", json={"prompt": "hi"}).status_code == 403
        denied = c.post(f"/v1/tasks/{task_id}/cancel")
        assert denied.status_code == 403 and "cancel" in denied.json()["detail"]
        assert c.get(f"/v1/tasks/{task_id}").status_code == 200


def test_another_tenants_task_is_404_on_every_route(server: ApiServer, redis_url: str) -> None:
    with server.client(make_key(redis_url, "acme")["key"]) as acme:
        task_id = acme.post("/v1/tasks", json={"prompt": "acme's"}).json()["id"]
    with server.client(make_key(redis_url, "globex")["key"]) as globex:
        for method, path in task_routes(task_id):
            answer = call(globex, method, path)
            assert answer.status_code == 404, (method, path, answer.text)
            assert task_id in answer.json()["detail"] or method == "POST"
        assert globex.get("/v1/tasks").json()["items"] == []
    # Its cancel really did nothing, and an admin key sees every tenant's tasks.
    with server.client(make_key(redis_url, "ops", "--scopes", "admin")["key"]) as admin:
        assert admin.get(f"/v1/tasks/{task_id}").json()["status"] == "queued"


def test_a_task_without_a_tenant_is_nobodys_over_http(server: ApiServer, redis_url: str) -> None:
    done = run_cli(redis_url, "submit", "from the CLI", "--json")
    assert done.code == 0, done.err
    task_id = done.out.split('"')[3]
    with server.client(make_key(redis_url, "acme")["key"]) as acme:
        assert acme.get(f"/v1/tasks/{task_id}").status_code == 404


def test_a_tenant_cannot_choose_its_tenant_label(server: ApiServer, redis_url: str) -> None:
    with server.client(make_key(redis_url, "acme")["key"]) as acme:
        refused = acme.post("/v1/tasks", json={"prompt": "hi", "labels": {"tenant": "globex"}})
        assert refused.status_code == 422 and "labels.tenant" in refused.json()["detail"]
        same = acme.post("/v1/tasks", json={"prompt": "hi", "labels": {"tenant": "acme"}})
        assert same.status_code == 202


def test_env_references_must_be_on_the_keys_allow_list(server: ApiServer,
                                                      redis_url: str) -> None:
    with server.client(make_key(redis_url, "acme")["key"]) as plain:
        refused = plain.post("/v1/tasks", json={"prompt": "hi", "mcp": GITHUB})
        assert refused.status_code == 422
        assert "${GITHUB_TOKEN}" in refused.json()["detail"]
    allowed = make_key(redis_url, "acme", "--allow-env", "GITHUB_TOKEN,NOTION_TOKEN")
    with server.client(allowed["key"]) as c:
        assert c.post("/v1/tasks", json={"prompt": "hi", "mcp": GITHUB}).status_code == 202


def test_env_references_in_envs_need_the_allow_list_too(server: ApiServer,
                                                        redis_url: str) -> None:
    """A worker resolves `${NAME}` in `envs` as in `mcp`: the sandbox (and so the agent)
    would get the worker's variable, so the same allow-list applies."""
    with server.client(make_key(redis_url, "acme")["key"]) as plain:
        refused = plain.post("/v1/tasks", json={"prompt": "hi",
                                                "envs": {"X": "${OTHER_TENANT_TOKEN}"}})
        assert refused.status_code == 422
        assert "${OTHER_TENANT_TOKEN}" in refused.json()["detail"]
        batch = plain.post("/v1/batches", json={"tasks": [{"prompt": "hi"}], "defaults": {
            "envs": {"X": "${OTHER_TENANT_TOKEN}"}}})
        assert batch.status_code == 422, batch.text
    allowed = make_key(redis_url, "acme", "--allow-env", "OTHER_TENANT_TOKEN")
    with server.client(allowed["key"]) as c:
        ok = c.post("/v1/tasks", json={"prompt": "hi", "envs": {"X": "${OTHER_TENANT_TOKEN}"}})
        assert ok.status_code == 202


def test_submit_rate_limit_is_429_with_retry_after(server: ApiServer, redis_url: str) -> None:
    key = make_key(redis_url, "tiny", "--rate-limit", "2")
    with server.client(key["key"]) as c:
        answers = [c.post("/v1/tasks", json={"prompt": f"n{n}"}) for n in range(5)]
    # Five quick submits span at most two one-minute windows: one of them refuses some.
    assert [r.status_code for r in answers[:2]] == [202, 202]
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.status_code in (202, 429) for r in answers)
    assert 1 <= int(refused[0].headers["retry-after"]) <= 60
    assert refused[0].json()["category"] == "rate_limited"


def test_redis_keeps_only_the_hash_of_a_key(server: ApiServer, redis_url: str,
                                            rdb: redis.Redis) -> None:
    created = make_key(redis_url, "acme")
    with server.client(created["key"]) as c:
        assert c.get("/v1/tasks").status_code == 200
    secret = created["key"][len("sqk_") + 16 + 1:].encode()  # the part after the key's id
    assert len(secret) >= 40
    assert all(secret not in k and secret not in v for k, v in dump_redis(rdb))
    listed = run_cli(redis_url, "apikey", "list", "--json")
    assert created["id"] in listed.out and created["key"] not in listed.out
    assert '"last_used_at": null' not in listed.out


def test_max_queued_per_key_refuses_beyond_the_tenants_unfinished_tasks(
        server: ApiServer, redis_url: str) -> None:
    # No worker consumes this queue: submitted tasks stay unfinished
    key = make_key(redis_url, "busy", "--max-queued", "2")
    body = {"prompt": "wait", "envs": {"SIM_LATENCY_S": "0"}}
    with server.client(key["key"]) as c:
        first, second, third = (c.post("/v1/tasks", json=body) for _ in range(3))
        assert [first.status_code, second.status_code] == [202, 202]
        assert third.status_code == 429 and third.json()["category"] == "rate_limited"
        assert "2 unfinished" in third.json()["detail"] and third.headers["retry-after"]
        # When one ends (cancelled while queued: it ends at once), there is room again
        assert c.post(f"/v1/tasks/{first.json()['id']}/cancel").status_code < 300
        assert c.post("/v1/tasks", json=body).status_code == 202


def test_an_admin_key_lists_reads_follows_and_cancels_every_tenants_tasks(
        server: ApiServer, redis_url: str) -> None:
    # Given tasks of two tenants (no worker: they stay queued) and one from the CLI
    with server.client(make_key(redis_url, "acme")["key"]) as acme:
        a1 = acme.post("/v1/tasks", json={"prompt": "acme 1"}).json()["id"]
        a2 = acme.post("/v1/tasks", json={"prompt": "acme 2", "labels": {"k": "v"}}).json()["id"]
    with server.client(make_key(redis_url, "globex")["key"]) as globex:
        g1 = globex.post("/v1/tasks", json={"prompt": "globex 1"}).json()["id"]
        assert globex.get("/v1/tasks", params={"tenant": "acme"}).status_code == 404
        assert [t["id"] for t in globex.get("/v1/tasks", params={"tenant": "globex"})
                .json()["items"]] == [g1]
    done = run_cli(redis_url, "submit", "from the CLI", "--label", "k=v", "--json")
    assert done.code == 0, done.err
    cli = json.loads(done.out)["id"]
    with server.client(make_key(redis_url, "ops", "--scopes", "admin")["key"]) as admin:
        # When an admin key lists: every task, a tenant's or the CLI's, newest first, paged
        listed = admin.get("/v1/tasks").json()
        assert [(t["id"], t["tenant"]) for t in listed["items"]] == [
            (cli, None), (g1, "globex"), (a2, "acme"), (a1, "acme")]
        first = admin.get("/v1/tasks", params={"limit": 2}).json()
        rest = admin.get("/v1/tasks", params={"limit": 2, "cursor": first["next_cursor"]})
        assert [t["id"] for t in first["items"] + rest.json()["items"]] == [cli, g1, a2, a1]
        assert [t["id"] for t in admin.get("/v1/tasks", params={"label": "k=v"})
                .json()["items"]] == [cli, a2]
        # or one tenant's, with the usual filters
        assert [t["id"] for t in admin.get("/v1/tasks", params={"tenant": "acme"})
                .json()["items"]] == [a2, a1]
        assert [t["id"] for t in admin.get("/v1/tasks", params={
            "tenant": "acme", "label": "k=v"}).json()["items"]] == [a2]
        assert admin.get("/v1/tasks", params={"tenant": "nobody"}).json()["items"] == []
        # and reads, cancels and follows them
        assert admin.get(f"/v1/tasks/{g1}").json()["tenant"] == "globex"
        assert admin.post(f"/v1/tasks/{g1}/cancel").json()["outcome"] == "cancelled"
        with admin.stream("GET", f"/v1/tasks/{g1}/events") as response:
            assert response.status_code == 200
            frames = [f.data for f in sse_frames(response)]
        assert frames[-1]["phase"] == "result" and frames[-1]["status"] == "cancelled"
        assert admin.get(f"/v1/tasks/{g1}/result").json()["status"] == "cancelled"


def test_an_admin_key_reads_follows_and_cancels_every_tenants_batches(
        server: ApiServer, redis_url: str) -> None:
    with server.client(make_key(redis_url, "globex")["key"]) as globex:
        posted = globex.post("/v1/batches", json=[{"prompt": "one"}, {"prompt": "two"}])
        assert posted.status_code == 202, posted.text
        batch_id = posted.json()["id"]
    with server.client(make_key(redis_url, "acme")["key"]) as acme:
        for method, path in (("GET", ""), ("GET", "/results"), ("GET", "/events"),
                             ("POST", "/cancel")):
            answer = acme.request(method, f"/v1/batches/{batch_id}{path}")
            assert answer.status_code == 404, (method, path, answer.text)
    with server.client(make_key(redis_url, "ops", "--scopes", "admin")["key"]) as admin:
        assert admin.get(f"/v1/batches/{batch_id}").json()["by_status"]["queued"] == 2
        assert admin.post(f"/v1/batches/{batch_id}/cancel").json()["cancelled"] == 2
        with admin.stream("GET", f"/v1/batches/{batch_id}/events") as response:
            frames = [f.data for f in sse_frames(response)]
        assert frames[-1]["phase"] == "done"
        assert frames[-1]["by_status"]["cancelled"] == 2
        assert len(admin.get(f"/v1/batches/{batch_id}/results").text.splitlines()) == 2
        # A batch that does not exist is 404 for an admin too
        assert admin.get("/v1/batches/0000000000000000").status_code == 404
