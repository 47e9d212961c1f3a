"""A deadline clamped by the worker's SANDQUEUE_MAX_TIMEOUT_S is said, not silent (issue 8.13).

Two limits exist: the producer's SANDQUEUE_MAX_TIMEOUT_S refuses a task above it; a
worker's clamps the deadline, records it in the result and logs it. Workers advertise their
limit in Redis, so a producer that knows it warns at submit.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fakeredis
import pytest

from producer.api import Client
from sandqueue import errors, keys
from sandqueue.contract import AgentResult, AgentTask, TaskMessage
from sandqueue.settings import Settings
from worker.runtime import Runtime


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"sandbox": "sim", "backoff_scale": 0, "sim_create_latency_s": 0,
                              "sim_latency_s": 0.02, "default_timeout_s": 60,
                              "max_timeout_s": 100}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def _runtime(server: fakeredis.FakeServer | None = None) -> Runtime:
    rt = Runtime(_settings(), worker_name="w-limits")
    rt.__dict__["redis"] = fakeredis.FakeRedis(server=server)
    rt.start_maintenance = lambda: None  # type: ignore[method-assign]
    return rt


def _message(**fields: Any) -> dict[str, Any]:
    return TaskMessage(task=AgentTask(prompt="hello", **fields)).model_dump(mode="json")


def test_a_clamped_deadline_is_recorded_in_the_result_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    rt = _runtime()
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        result = AgentResult.model_validate(rt.handle("t1", (_message(timeout_s=500),), {}))
    assert result.ok
    assert (result.timeout_s_requested, result.timeout_s_applied) == (500, 100)
    assert len(result.warnings) == 1 and "SANDQUEUE_MAX_TIMEOUT_S" in result.warnings[0]
    assert "100s deadline" in result.warnings[0]
    assert any("SANDQUEUE_MAX_TIMEOUT_S" in r.getMessage() and "t1" in r.getMessage()
               for r in caplog.records)
    record = rt.store.get("t1")
    assert float(record["deadline_at"]) - float(record["started_at"]) == pytest.approx(100)
    started = json.loads(rt.redis.xrange(keys.events("t1"))[0][1][b"data"])
    assert started["phase"] == "started" and started["warnings"] == result.warnings


@pytest.mark.parametrize(("asked", "applied"), [(50, 50), (None, 60)])
def test_a_deadline_within_the_limit_carries_no_warning(asked: float | None,
                                                        applied: float) -> None:
    rt = _runtime()
    result = AgentResult.model_validate(rt.handle("t2", (_message(timeout_s=asked),), {}))
    assert (result.timeout_s_requested, result.timeout_s_applied) == (asked, applied)
    assert result.warnings == []


# -- the producer side ---------------------------------------------------------------------

def _client(server: fakeredis.FakeServer, **settings: Any) -> Client:
    client = Client(_settings(**settings))
    client.__dict__["redis"] = fakeredis.FakeRedis(server=server)
    return client


def _advertising_worker(server: fakeredis.FakeServer, queues: list[str]) -> Runtime:
    rt = _runtime(server)
    rt.queues = queues
    rt.new_maintenance().advertise()
    return rt


def test_the_producer_warns_once_when_the_queues_workers_would_clamp(
        caplog: pytest.LogCaptureFixture) -> None:
    """Given a worker on queue `sandqueue` that allows 100 s, a producer allowing 3000 s
    accepts timeout_s=500 but warns, once however many tasks ask for it."""
    server = fakeredis.FakeServer()
    _advertising_worker(server, ["sandqueue"])
    client = _client(server, max_timeout_s=3000, default_timeout_s=60,
                     sandbox_lifetime_s=3500)
    with caplog.at_level(logging.WARNING, logger="sandqueue.producer"):
        for _ in range(3):
            task = client.prepare("x", timeout_s=500)
            assert task.timeout_s == 500  # accepted: the producer's own limit allows it
        client.prepare("x", timeout_s=90)  # within every limit
        client.prepare("x", timeout_s=500, queue="heavy")  # no worker of `heavy` is known
    warnings = [r.getMessage() for r in caplog.records if r.name == "sandqueue.producer"]
    assert len(warnings) == 1, warnings
    assert "'sandqueue'" in warnings[0] and "100s deadline" in warnings[0]


def test_workers_gone_quiet_are_forgotten() -> None:
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    r.hset(keys.WORKER_LIMITS, "dead-worker", json.dumps(
        {"queues": ["sandqueue"], "max_timeout_s": 10, "until": time.time() - 1}))
    client = _client(server, max_timeout_s=3000, default_timeout_s=60,
                     sandbox_lifetime_s=3500)
    assert client.worker_max_timeout_s("sandqueue") is None
    _advertising_worker(server, ["sandqueue", "heavy"])
    assert r.hkeys(keys.WORKER_LIMITS) == [b"w-limits"], "the stale entry was pruned"
    fresh = _client(server, max_timeout_s=3000, default_timeout_s=60, sandbox_lifetime_s=3500)
    assert fresh.worker_max_timeout_s("heavy") == 100
    assert r.ttl(keys.WORKER_LIMITS) > 0, "the hash must not outlive the fleet"


def test_above_the_producers_own_limit_is_refused_naming_that_setting() -> None:
    client = _client(fakeredis.FakeServer())
    with pytest.raises(errors.InvalidTask) as info:
        client.prepare("x", timeout_s=500)
    assert "this producer's maximum (100s" in info.value.message
    assert "SANDQUEUE_MAX_TIMEOUT_S" in info.value.message
