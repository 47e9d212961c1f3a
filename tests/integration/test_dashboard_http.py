"""The dashboard's HTTP side through a real `sandqueue serve` and redis-server: the login
cookie, the security headers, escaping, CSRF and tenant checks on actions, the admin's view
of every tenant, and a 10,000-task table that costs one page of Redis work."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from producer.api import Client
from producer.http.dashboard.pages import PAGE_ROWS
from producer.http.dashboard.session import COOKIE
from sandqueue.contract import AgentTask
from sandqueue.localredis import start_redis
from tests.integration.conftest import run_cli
from tests.integration.http_server import (
    ApiServer,
    make_key,
    serve_fixture,
    sse_frames,
    start_server,
)

HOSTILE = '<img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory)


@contextmanager
def browser(server: ApiServer, key: str) -> Iterator[httpx.Client]:
    """A cookie-keeping client logged in through the form, as a browser would be."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/login", data={"api_key": key, "next": "/"})
        assert answer.status_code == 303, answer.text
        yield client


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def submit(server: ApiServer, key: str, body: dict[str, object]) -> str:
    with server.client(key) as api:
        answer = api.post("/v1/tasks", json=body)
        assert answer.status_code == 202, answer.text
        task_id: str = answer.json()["id"]
        return task_id


def test_login_sets_an_httponly_strict_cookie_and_pages_forbid_inline_script(
        server: ApiServer, redis_url: str) -> None:
    key = make_key(redis_url, "acme")["key"]
    anonymous = httpx.get(server.url + "/", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login?next=%2F"
    wrong = httpx.post(server.url + "/login", data={"api_key": "sqk_nope_nope"})
    assert wrong.status_code == 401 and "login-error" in wrong.text
    answer = httpx.post(server.url + "/login", data={"api_key": key, "next": "//evil.example/"})
    assert answer.status_code == 303 and answer.headers["location"] == "/"  # no open redirect
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower() and "Secure" not in cookie  # plain http here
    with browser(server, key) as client:
        page = client.get("/")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in page.text and " style=" not in page.text  # nothing inline
        assert client.get("/static/dash.js").status_code == 200
        # Logging out forgets the key: the next page asks to log in again
        client.post("/logout", data={"csrf": csrf_of(page.text)})
        assert client.get("/", follow_redirects=False).status_code == 303


def test_the_cookie_holds_a_session_not_the_key_and_revoking_the_key_ends_it(
        server: ApiServer, redis_url: str, rdb: redis.Redis) -> None:
    made = make_key(redis_url, "acme")
    with browser(server, made["key"]) as client:
        token = client.cookies[COOKIE]
        assert made["key"] not in token and made["key"].split("_")[-1] not in token
        with server.client(token) as api:  # a stolen cookie is no key to the /v1 API
            assert api.get("/v1/tasks").status_code == 401
        raw = token.encode()
        stored = [k for k in rdb.keys("*") if raw in k or (rdb.type(k) == b"hash" and any(
            raw in v for v in rdb.hgetall(k).values()))]
        assert stored == []  # Redis keeps the session token's hash only
        assert client.get("/").status_code == 200
        assert run_cli(redis_url, "apikey", "revoke", made["id"]).code == 0
        ended = client.get("/", follow_redirects=False)
        assert ended.status_code == 303 and ended.headers["location"].startswith("/login")
        assert ended.headers["location"].endswith("&ended=refused")  # and the form says why
        assert "revoked" in httpx.get(server.url + ended.headers["location"]).text
        assert f'{COOKIE}=""' in ended.headers.get("set-cookie", "")  # and drops the cookie


def test_login_refuses_a_key_without_read_scope_and_another_sites_form(
        server: ApiServer, redis_url: str) -> None:
    submitter = make_key(redis_url, "acme", "--scopes", "submit")["key"]
    answer = httpx.post(server.url + "/login", data={"api_key": submitter})
    assert answer.status_code == 403 and "`read` scope" in answer.text
    assert "set-cookie" not in answer.headers
    key = make_key(redis_url, "acme")["key"]
    elsewhere = httpx.post(server.url + "/login", data={"api_key": key},
                           headers={"Origin": "https://evil.example"})
    assert elsewhere.status_code == 403 and "set-cookie" not in elsewhere.headers  # login CSRF
    made_up = httpx.get(server.url + "/login", params={"ended": "<b>anything</b>"}).text
    assert "anything" not in made_up  # the reason comes from a fixed list, not the link


def test_prompts_labels_and_results_are_escaped(server: ApiServer, redis_url: str,
                                                worker_factory: object) -> None:
    worker_factory(concurrency=1)  # type: ignore[operator]
    key = make_key(redis_url, "acme")["key"]
    task_id = submit(server, key, {"prompt": f"say {HOSTILE}", "labels": {"x": HOSTILE}})
    with server.client(key) as api:
        assert api.get(f"/v1/tasks/{task_id}/result?wait=60").status_code == 200
    with browser(server, key) as client:
        for path in ("/", f"/tasks/{task_id}", f"/?label=x%3D{HOSTILE}"):
            body = client.get(path).text
            assert HOSTILE not in body, path
            assert "&lt;img src=x onerror=" in body, path  # shown, as text


def test_actions_need_the_page_token_the_scope_and_the_owner(
        server: ApiServer, redis_url: str, rdb: redis.Redis) -> None:
    acme = make_key(redis_url, "acme")["key"]
    globex = make_key(redis_url, "globex")["key"]
    reader = make_key(redis_url, "acme", "--scopes", "read")["key"]
    task_id = submit(server, acme, {"prompt": "wait in the queue"})  # no worker: stays queued
    cancel = f"/tasks/{task_id}/cancel"
    with browser(server, globex) as other:
        token = csrf_of(other.get("/").text)
        assert other.get(f"/tasks/{task_id}").status_code == 404
        assert other.post(cancel, data={"csrf": token}).status_code == 404
    with server.client(acme) as api:
        batch = api.post("/v1/batches", json=[{"prompt": "queued too"}]).json()["id"]
    with browser(server, globex) as other:
        token = csrf_of(other.get("/").text)
        assert other.get(f"/batches/{batch}").status_code == 404
        assert batch not in other.get("/batches").text
        for action in ("cancel", "retry"):
            answer = other.post(f"/batches/{batch}/{action}", data={"csrf": token})
            assert answer.status_code == 404, action
    assert rdb.hget(f"sq:batch:{batch}", "status") == b"running"
    with browser(server, reader) as read_only:
        token = csrf_of(read_only.get("/").text)
        assert read_only.post(cancel, data={"csrf": token}).status_code == 403
    with browser(server, acme) as client:
        token = csrf_of(client.get(f"/tasks/{task_id}").text)
        assert client.post(cancel, data={}).status_code == 403
        assert client.post(cancel, data={"csrf": "0" * 64}).status_code == 403
        assert client.post(cancel, data={"csrf": token},
                           headers={"Origin": "https://evil.example"}).status_code == 403
        assert rdb.hget(f"sq:task:{task_id}", "status") == b"queued"
        answer = client.post(cancel, data={"csrf": token}, headers={"Origin": server.url})
        assert answer.status_code == 303
    assert rdb.hget(f"sq:task:{task_id}", "status") == b"cancelled"


def test_an_admin_key_sees_every_tenant_and_can_narrow_to_one(
        server: ApiServer, redis_url: str) -> None:
    acme, globex = make_key(redis_url, "acme")["key"], make_key(redis_url, "globex")["key"]
    admin = make_key(redis_url, "ops", "--scopes", "admin")["key"]
    a = submit(server, acme, {"prompt": "a"})
    g = submit(server, globex, {"prompt": "g"})
    done = run_cli(redis_url, "submit", "from the CLI, no tenant", "--json")
    assert done.code == 0, done.err
    cli = json.loads(done.out)["id"]
    with browser(server, admin) as client:
        everything = client.get("/").text
        assert a in everything and g in everything and cli in everything
        only_globex = client.get("/?tenant=globex").text
        assert g in only_globex and a not in only_globex and cli not in only_globex
        # a tenant no API key has (a CLI task's `--label tenant=`) filters all the same
        labelled = run_cli(redis_url, "submit", "initech's", "--label", "tenant=initech",
                           "--json")
        initech = json.loads(labelled.out)["id"]
        only_initech = client.get("/?tenant=initech").text
        assert initech in only_initech and not {a, g, cli} & set(re.findall(
            r'data-id="([^"]+)"', only_initech))
        assert client.get(f"/tasks/{a}").status_code == 200
        assert client.get(f"/tasks/{cli}").status_code == 200
    with browser(server, acme) as client:
        own = client.get("/?tenant=globex").text  # a tenant key cannot widen its view
        assert a in own and g not in own and cli not in own
        assert client.get(f"/tasks/{cli}").status_code == 404


def test_an_admins_live_page_counts_new_tasks_submitted_without_a_tenant(
        server: ApiServer, redis_url: str) -> None:
    admin = make_key(redis_url, "ops", "--scopes", "admin")["key"]
    acme = make_key(redis_url, "acme")["key"]
    with browser(server, admin) as client, client.stream(
            "GET", "/live/tasks", params={"newer_than": time.time() - 0.001}) as live:
        assert live.status_code == 200
        frames = sse_frames(live)  # nothing is sent until something changes
        assert run_cli(redis_url, "submit", "from the CLI", "--json").code == 0
        assert next(frames).data["newer"] == 1
        submit(server, acme, {"prompt": "a tenant's"})
        assert next(frames).data["newer"] == 2


def command_calls(rdb: redis.Redis) -> dict[str, int]:
    stats = rdb.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_ten_thousand_tasks_render_one_page_with_bounded_redis_work(
        server: ApiServer, redis_url: str, rdb: redis.Redis, api_client: Client) -> None:
    # Given 10,000 queued tasks of one tenant (submitted as the API does, no worker)
    key = make_key(redis_url, "acme")["key"]
    tasks = [AgentTask(prompt=f"task {i}", labels={"tenant": "acme"}) for i in range(10_000)]
    ids = [h.id for h in api_client.submit_many(tasks)]
    assert rdb.zcard("sq:idx:tenant:acme") == 10_000
    with browser(server, key) as client:
        # When the task table is asked for, counting every command Redis runs meanwhile
        rdb.config_resetstat()
        first = client.get("/")
        calls = command_calls(rdb)
    # Then it holds one page of rows, the newest, and Redis did work for one page only
    newest = [m.decode() for m in rdb.zrevrange("sq:idx:tenant:acme", 0, -1)]
    assert set(newest) == set(ids)  # (tasks submitted together share a time: Redis orders those)
    shown = re.findall(r'<tr data-id="([^"]+)"', first.text)
    assert shown == newest[:PAGE_ROWS]
    assert calls.get("hgetall", 0) <= 2 * PAGE_ROWS + 5, calls
    assert sum(n for name, n in calls.items() if name not in ("info", "config|resetstat")
               ) < 4 * PAGE_ROWS, calls
    # And the "older" link pages on, without repeats
    older = re.search(r'href="(/\?[^"]*cursor=[^"]+)" id="older"', first.text)
    assert older, "no link to older tasks"
    with browser(server, key) as client:
        second = client.get(older.group(1).replace("&amp;", "&")).text
    assert re.findall(r'<tr data-id="([^"]+)"', second) == newest[PAGE_ROWS:2 * PAGE_ROWS]


def test_a_pages_live_streams_ask_eventsource_to_retry_while_redis_is_down(
        tmp_path: Path) -> None:
    """EventSource gives up for good on any answer but 200 text/event-stream: a 503 during a
    Redis restart left every open page frozen. A stream request (Accept: text/event-stream)
    gets a 200 that says retry; a plain API client still gets the 503 problem."""
    local = start_redis()
    server = start_server(local.url, tmp_path)
    try:
        key = make_key(local.url, "acme")["key"]
        task_id = submit(server, key, {"prompt": "watched"})
        with browser(server, key) as page:
            local.stop()
            sse = {"Accept": "text/event-stream"}
            for path in (f"/tasks/{task_id}/events", "/fleet/live",
                         f"/live/tasks?ids={task_id}", f"/v1/tasks/{task_id}/events"):
                answer = page.get(path, headers={**sse, "Authorization": f"Bearer {key}"})
                assert answer.status_code == 200, (path, answer.status_code, answer.text)
                assert answer.headers["content-type"].startswith("text/event-stream")
                assert "retry:" in answer.text and "reconnect" in answer.text
            plain = page.get(f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"})
            assert plain.status_code == 503
            assert plain.headers["content-type"] == "application/problem+json"
    finally:
        server.stop()
        local.stop()
