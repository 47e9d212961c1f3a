"""The outbox's claim records a task's tenant (and labels) and indexes it under the tenant and
in the all-tasks index in the same atomic step as the task record: no task is ever listed
without an owner, or owned without being listed. Runs the real Lua on fakeredis."""

from __future__ import annotations

import json

import fakeredis

from producer.outbox import Outbox
from sandqueue import keys
from sandqueue.contract import AgentTask


def claim(outbox: Outbox, task_id: str, task: AgentTask, now: float) -> str:
    (verdict,) = outbox.claim([(task_id, task, {"task": {}}, "q")], now)
    return verdict.verdict


def test_a_task_with_a_tenant_is_recorded_and_indexed_with_it() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    outbox = Outbox(r, ttl_s=3600)
    task = AgentTask(prompt="hi", labels={"tenant": "acme", "team": "web"})
    assert claim(outbox, "t1", task, 1000.0) == "new"
    record = r.hgetall(keys.task("t1"))
    assert record["tenant"] == "acme"
    assert json.loads(record["labels"]) == {"tenant": "acme", "team": "web"}
    assert r.zrange(keys.tenant_index("acme"), 0, -1, withscores=True) == [("t1", 1000.0)]
    assert 0 < r.ttl(keys.tenant_index("acme")) <= 3600


def test_a_task_without_a_tenant_is_in_the_all_tasks_index_only() -> None:
    # A task from the CLI or Python (no API key, no tenant): an admin lists it, no tenant does
    r = fakeredis.FakeRedis(decode_responses=True)
    outbox = Outbox(r, ttl_s=3600)
    assert claim(outbox, "t1", AgentTask(prompt="hi", labels={"team": "web"}), 1000.0) == "new"
    record = r.hgetall(keys.task("t1"))
    assert "tenant" not in record and json.loads(record["labels"]) == {"team": "web"}
    assert [k for k in r.scan_iter(keys.tenant_index("*"))] == []
    assert r.zrange(keys.TASK_INDEX, 0, -1, withscores=True) == [("t1", 1000.0)]
    assert 0 < r.ttl(keys.TASK_INDEX) <= 3600


def test_the_index_forgets_tasks_older_than_the_results() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    outbox = Outbox(r, ttl_s=3600)
    task = AgentTask(prompt="hi", labels={"tenant": "acme"})
    claim(outbox, "old", task, 1000.0)
    claim(outbox, "cli", AgentTask(prompt="no tenant"), 1000.0)
    claim(outbox, "new", task.model_copy(update={"prompt": "later"}), 1000.0 + 3601)
    assert r.zrange(keys.tenant_index("acme"), 0, -1) == ["new"]
    assert r.zrange(keys.TASK_INDEX, 0, -1) == ["new"]


def test_a_duplicate_submit_does_not_index_twice() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    outbox = Outbox(r, ttl_s=3600)
    task = AgentTask(prompt="hi", labels={"tenant": "acme"}, idempotency_key="k")
    assert claim(outbox, "t1", task, 1000.0) == "new"
    assert claim(outbox, "t2", task, 1001.0) == "republish"
    assert r.zrange(keys.tenant_index("acme"), 0, -1) == ["t1"]
    assert r.zrange(keys.TASK_INDEX, 0, -1) == ["t1"]
