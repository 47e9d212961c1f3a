"""The metric definitions: bounded labels, the fleet collector, the worker port's settings."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from sandqueue import keys, metrics
from sandqueue.errors import ConfigError
from sandqueue.settings import load_settings


def test_tenant_labels_are_capped_per_process() -> None:
    labels = metrics.TenantLabels(limit=2)
    assert [labels(t) for t in ["a", "b", "a", "c", None, ""]] == [
        "a", "b", "a", metrics.OTHER_TENANT, metrics.NO_TENANT, metrics.NO_TENANT]


def _families(collector: metrics.FleetCollector) -> dict[str, list[object]]:
    text = metrics.render(collector).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_the_fleet_collector_yields_every_fleet_gauge_it_declares() -> None:
    r = fakeredis.FakeRedis()
    now = time.time()
    r.hset(keys.WORKER_LIMITS, "w1", '{"queues": ["sandqueue"], "until": %f, '
           '"concurrency": 3, "max_live_sandboxes": 20, "max_creates_per_s": 1}' % (now + 30))
    r.zadd(keys.RUNNING, {"t1": now + 10})
    r.hset(keys.RUNNING_OWNERS, "t1", "w1")
    r.hset(keys.task("t1"), "tenant", "acme")
    r.zadd(keys.LIMIT_SANDBOXES, {"t1:1": now + 10})
    names = {n for n in _families(metrics.FleetCollector(lambda: r))
             if n in metrics.FLEET_METRIC_NAMES}
    assert names == metrics.FLEET_METRIC_NAMES
    samples = {s.name: s for f in _families(metrics.FleetCollector(lambda: r)).values()
               for s in f}  # type: ignore[attr-defined]
    assert samples["sandqueue_live_sandboxes"].value == 1
    assert samples["sandqueue_live_sandboxes_cap"].value == 20
    assert samples["sandqueue_fleet_worker_in_flight"].labels == {"worker": "w1"}


def test_an_unreachable_redis_fails_the_fleet_gauges_not_the_scrape() -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    families = _families(metrics.FleetCollector(lambda: dead))
    assert [s.value for s in families["sandqueue_fleet_up"]] == [0]  # type: ignore[attr-defined]
    assert "sandqueue_queue_depth" not in families
    assert "sandqueue_tasks_finished" in families, "this process's own metrics still come"


def test_the_worker_metrics_port_refuses_the_prefork_pool() -> None:
    with pytest.raises(ConfigError, match="threads or solo pool"):
        load_settings(_env_file=None, metrics_port=9100, pool="prefork")
    assert load_settings(_env_file=None, metrics_port=9100, pool="threads").metrics_port == 9100


def test_fleet_tenant_series_are_capped_with_the_rest_summed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    r = fakeredis.FakeRedis()
    r.hset(keys.STATS_SUBMITTED, mapping={"big": 50, "mid": 20, "small": 3, "tiny": 1})
    monkeypatch.setattr(metrics.tenant_label, "limit", 2)
    families = _families(metrics.FleetCollector(lambda: r))
    submitted = {s.labels["tenant"]: s.value  # type: ignore[attr-defined]
                 for s in families["sandqueue_tasks_submitted"]
                 if s.name.endswith("_total")}  # type: ignore[attr-defined]
    assert submitted == {"big": 50, "mid": 20, metrics.OTHER_TENANT: 4}


def test_otlp_tracing_without_its_exporter_is_a_configuration_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandqueue import settings

    monkeypatch.setattr(settings, "_otlp_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"sandqueue\[otlp\]"):
        load_settings(_env_file=None, tracing="otlp")
    assert load_settings(_env_file=None, tracing="console").tracing == "console"
    monkeypatch.setattr(settings, "_otlp_installed", lambda: True)
    assert load_settings(_env_file=None, tracing="otlp").tracing == "otlp"


def test_console_tracing_prints_the_spans(capsys: pytest.CaptureFixture[str]) -> None:
    from sandqueue import tracing

    tracing.setup("console", "sandqueue-test")
    try:
        assert tracing.enabled()
        tracing.tracer().start_span("sandqueue.submit").end()
    finally:
        tracing.reset()  # flushes the batch processor
    assert '"name": "sandqueue.submit"' in capsys.readouterr().out
    assert not tracing.enabled()
