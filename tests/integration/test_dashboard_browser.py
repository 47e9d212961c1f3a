"""The dashboard in a real browser (headless Chromium, Selenium), as an operator uses it:
through a real `sandqueue serve`, a real redis-server and a real sim worker. Each page is
saved to test-output/screenshots/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

try:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the dev extra brings it; under CI its absence is a failure
    if os.environ.get("CI"):
        raise
    pytest.skip("selenium is not installed (pip install -e '.[dev]')", allow_module_level=True)

from sandqueue import keys
from tests.integration.browser import chrome, screenshot
from tests.integration.conftest import StartWorker, wait_until
from tests.integration.http_server import ApiServer, make_key, serve_fixture

__all__ = ["chrome"]
WAIT_S = 60.0
SLOW = {"SIM_LATENCY_S": "40", "SIM_TOOL_CALLS": "8"}
"""A task that runs about 40 s, making a tool call every ~4.5 s: long enough to watch."""
QUIET_OK = {"SANDQUEUE_STALL_TIMEOUT_S": "60"}
"""Workers here run agents that are quiet for seconds between tool calls."""


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_fixture(redis_url, tmp_path_factory)


@pytest.fixture
def driver(chrome: WebDriver, server: ApiServer) -> WebDriver:
    chrome.delete_all_cookies()
    chrome.set_window_size(1440, 1000)
    return chrome


def api(server: ApiServer, key: str) -> httpx.Client:
    return server.client(key)


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    answer = client.post("/v1/tasks", json=body)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["id"]
    return task_id


def log_in(driver: WebDriver, server: ApiServer, key: str, path: str = "/",
           shot: str | None = None) -> None:
    """Open a page, get sent to the login form, log in, land back on the page."""
    driver.get(server.url + path)
    WebDriverWait(driver, WAIT_S).until(lambda d: "/login" in d.current_url)
    if shot:
        screenshot(driver, shot)
    driver.find_element(By.ID, "api_key").send_keys(key)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: "/login" not in d.current_url)
    assert driver.current_url.split(server.url, 1)[1] == path


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def rows(driver: WebDriver, table_id: str) -> list[str]:
    """The table's rows as text, read in one go (live updates replace rows meanwhile)."""
    found: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), (r) => r.innerText);",
        f"#{table_id} tbody tr")
    return found


def wait_for(driver: WebDriver, what: str, predicate: Any) -> Any:
    """Poll `predicate(driver)`; an element that vanished because the page moved on (a form
    posted, a live update replaced it) just means: look again."""
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2,
                         ignored_exceptions=(NoSuchElementException,
                                             StaleElementReferenceException)).until(
        lambda d: predicate(d), message=f"waiting for {what}")


def mark_page(driver: WebDriver) -> None:
    """A value in this page's window: gone if the page reloads."""
    driver.execute_script("window.__sqMark = 'same page';")


def same_page(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return window.__sqMark === 'same page';"))


def test_log_in_watch_a_running_task_live_and_cancel_it(
        driver: WebDriver, server: ApiServer, redis_url: str, worker_factory: StartWorker,
        rdb: redis.Redis) -> None:
    # Given a worker running a slow task of tenant acme
    worker_factory(concurrency=2, env=QUIET_OK)
    key = make_key(redis_url, "acme")["key"]
    with api(server, key) as client:
        task_id = submit(client, {"prompt": "review <b>the</b> code", "envs": SLOW,
                                  "mcp": {"duckduckgo": {}}, "labels": {"team": "web<script>"}})
    # When the operator logs in, the task table lists it
    log_in(driver, server, key, shot="login")
    row = wait_for(driver, "the task's row",
                   lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{task_id}"]'))[0]
    assert "team=web<script>" in row.text  # shown as text, not markup
    wait_for(driver, "the row to turn running without a reload",
             lambda d: "running" in d.find_element(By.CSS_SELECTOR,
                                                   f'tr[data-id="{task_id}"]').text)
    # And a task submitted meanwhile is announced above the table, without a reload
    mark_page(driver)
    with api(server, key) as client:
        submit(client, {"prompt": "a newer one"})
    wait_for(driver, "the newer-task note", lambda d: d.find_element(By.ID, "live-note")
             .is_displayed() and text(d, "newer-count") == "1")
    assert same_page(driver)
    screenshot(driver, "tasks")
    # And its page shows the timeline growing as events arrive, without reloading
    driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{task_id}"] a').click()
    wait_for(driver, "the task page", lambda d: d.find_elements(By.ID, "timeline"))
    mark_page(driver)
    before_tools = int(text(driver, "tool-count"))
    before_rows = len(rows(driver, "events"))
    wait_for(driver, "two more tool calls on the page",
             lambda d: int(text(d, "tool-count")) >= before_tools + 2)
    assert same_page(driver), "the page reloaded instead of updating live"
    assert len(rows(driver, "events")) >= before_rows + 2
    assert any("MCP gateway ready" in r for r in rows(driver, "timeline"))
    assert any("agent running" in r for r in rows(driver, "timeline"))
    assert text(driver, "status") == "running"
    screenshot(driver, "task-running")
    # When it is cancelled from its page
    driver.find_element(By.ID, "cancel").click()
    # Then the status changes to cancelled on the page, and in Redis
    wait_for(driver, "the status to read cancelled", lambda d: text(d, "status") == "cancelled")
    assert any("result: cancelled" in r for r in rows(driver, "timeline"))
    wait_until(lambda: rdb.hget(keys.task(task_id), "status") == b"cancelled", WAIT_S,
               "the task's record to say cancelled")
    driver.get(f"{server.url}/tasks/{task_id}")
    wait_for(driver, "the result panel", lambda d: d.find_elements(By.ID, "error"))
    assert "cancelled" in text(driver, "error")
    assert not driver.find_elements(By.ID, "cancel")  # nothing left to cancel
    # (the agent sees one MCP server, the gateway that fronts the catalog's servers)
    assert rows(driver, "mcp") == ["e2b-mcp-gateway\tconnected"]
    screenshot(driver, "task-cancelled")


def test_a_batch_page_shows_its_counts_move(
        driver: WebDriver, server: ApiServer, redis_url: str,
        worker_factory: StartWorker, rdb: redis.Redis) -> None:
    # Given a batch of six tasks, one of them failing for good, on a two-slot worker
    worker_factory(concurrency=2, env=QUIET_OK)
    key = make_key(redis_url, "acme")["key"]
    tasks = [{"prompt": f"task {i}", "envs": {"SIM_LATENCY_S": str(3 + 2 * i)}}
             for i in range(5)]
    tasks.append({"prompt": "this one fails", "retry": {"max_attempts": 1},
                  "envs": {"SIM_FAIL": "agent:is_error", "SIM_LATENCY_S": "1"}})
    with api(server, key) as client:
        answer = client.post("/v1/batches", json=tasks)
        assert answer.status_code == 202, answer.text
        batch_id = answer.json()["id"]
    # When the operator opens it from the list of batches
    log_in(driver, server, key, "/batches")
    wait_for(driver, "the batch in the list", lambda d: batch_id in " ".join(rows(d, "batches")))
    screenshot(driver, "batches")
    driver.find_element(By.LINK_TEXT, batch_id).click()
    wait_for(driver, "the batch page", lambda d: d.find_elements(By.ID, "n-done"))
    mark_page(driver)
    first_done = int(text(driver, "n-done"))
    assert first_done < 5
    # Then its counts move live up to the end: five done, one failed, nothing left
    wait_for(driver, "the done count to grow", lambda d: int(text(d, "n-done")) > first_done)
    wait_for(driver, "the batch to finish",
             lambda d: (text(d, "n-done"), text(d, "n-failed"), text(d, "n-queued"),
                        text(d, "n-running")) == ("5", "1", "0", "0"))
    assert same_page(driver), "the page reloaded instead of updating live"
    failures = " ".join(rows(driver, "by-error"))
    assert "agent_error" in failures, failures
    assert text(driver, "p50") != "—"
    screenshot(driver, "batch")
    # And "retry failed" submits the failed input again, as a new task of the same batch
    failed_before = {k: v for k, v in _items(rdb, batch_id).items()
                     if rdb.hget(keys.task(v), "status") == b"failed"}
    assert len(failed_before) == 1
    driver.find_element(By.ID, "retry").click()
    wait_for(driver, "the batch page again", lambda d: d.find_elements(By.ID, "n-failed"))
    (input_key, old_id), = failed_before.items()
    new_id = _items(rdb, batch_id)[input_key]
    assert new_id != old_id
    assert rdb.hget(keys.task(new_id), "status") is not None
    # (it fails again: SIM_FAIL holds for every attempt) and the page follows it to the end
    wait_for(driver, "the retried input to end", lambda d: text(d, "n-failed") == "1"
             and text(d, "n-queued") == "0" and text(d, "n-running") == "0")
    wait_until(lambda: rdb.hget(keys.task(new_id), "status") == b"failed", WAIT_S,
               "the retried task to fail again")
    # The batch's tasks, from its page's link: six rows, the retried input's newest
    driver.find_element(By.PARTIAL_LINK_TEXT, "This batch's tasks").click()
    wait_for(driver, "the batch's task table", lambda d: len(rows(d, "tasks")) == 7)
    screenshot(driver, "tasks-of-batch")


def _items(rdb: redis.Redis, batch_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in rdb.hgetall(keys.batch(batch_id, "items")).items()}


def test_a_tenant_key_does_not_see_another_tenants_task(
        driver: WebDriver, server: ApiServer, redis_url: str,
        worker_factory: StartWorker) -> None:
    worker_factory(concurrency=1, env=QUIET_OK)
    acme = make_key(redis_url, "acme")["key"]
    globex = make_key(redis_url, "globex")["key"]
    with api(server, acme) as client:
        task_id = submit(client, {"prompt": "acme's secret plans"})
    # Given globex's operator logged in
    log_in(driver, server, globex)
    assert task_id not in driver.page_source
    # When they open acme's task by its id, Then it does not exist for them
    driver.get(f"{server.url}/tasks/{task_id}")
    assert "Not found" in driver.find_element(By.TAG_NAME, "h1").text
    assert "secret plans" not in driver.page_source
    screenshot(driver, "other-tenant-404", expected=("the server responded with a status of 404",))
    # And the fleet page shows only their own tenant's row
    driver.get(f"{server.url}/fleet")
    wait_for(driver, "a live worker", lambda d: "sqit-" in " ".join(rows(d, "workers")))
    tenants = [r.split()[0] for r in rows(driver, "tenants") if r.split()]
    assert tenants == ["globex"]
    # While an admin key sees every tenant's tasks, and every tenant on the fleet page
    driver.find_element(By.ID, "logout").click()
    admin = make_key(redis_url, "ops", "--scopes", "admin")["key"]
    log_in(driver, server, admin)
    wait_for(driver, "acme's task", lambda d: task_id in d.page_source)
    screenshot(driver, "tasks-admin")
    with api(server, acme) as client:
        busy = submit(client, {"prompt": "keep the fleet busy", "envs": SLOW})
        driver.get(f"{server.url}/fleet")
        wait_for(driver, "every tenant, acme's task running",
                 lambda d: {tuple(r.split()[:3]) for r in rows(d, "tenants")}
                 >= {("acme", "1", "0"), ("globex", "0", "0"), ("ops", "0", "0")})
        wait_for(driver, "the live sandbox", lambda d: text(d, "f-sandboxes") == "1")
        screenshot(driver, "fleet")
        assert client.post(f"/v1/tasks/{busy}/cancel").status_code == 202
        assert client.get(f"/v1/tasks/{busy}/result?wait=60").json()["status"] == "cancelled"
