"""deploy/grafana/sandqueue.json loads, and every query in it asks for metrics and labels the
code really exports (a renamed metric must not leave a dashboard of empty panels)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import fakeredis
from prometheus_client.parser import text_string_to_metric_families

from sandqueue import keys, metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/sandqueue.json"
METRIC = re.compile(r"\bsandqueue_[a-z0-9_]+\b")
SELECTOR_LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


def _exported_labels() -> dict[str, set[str]]:
    """Series name -> its label names, from a scrape of everything the code exports (every
    per-process metric touched once, the fleet collector over a fleet with one of each)."""
    metrics.TASKS_FINISHED.labels(status="succeeded", error="")
    metrics.ATTEMPTS.labels(outcome="succeeded", retried="false")
    metrics.PHASE_SECONDS.labels(phase="queued")
    metrics.COST_USD.labels(tenant="t")
    metrics.TOKENS.labels(tenant="t", kind="input")
    metrics.WEBHOOK_DELIVERIES.labels(outcome="delivered")
    r = fakeredis.FakeRedis()
    now = time.time()
    r.hset(keys.WORKER_LIMITS, "w", json.dumps({"queues": ["q"], "until": now + 30,
                                                "concurrency": 1, "max_live_sandboxes": 2,
                                                "max_creates_per_s": 1}))
    r.hset(keys.STATS_SUBMITTED, "t", 1)
    text = metrics.render(metrics.FleetCollector(lambda: r)).decode()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_the_dashboard_is_importable_grafana_json() -> None:
    data = _dashboard()
    assert data["uid"] == "sandqueue" and data["schemaVersion"] >= 36
    assert [i["name"] for i in data["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_query_names_only_exported_metrics_and_labels() -> None:
    exported = _exported_labels()
    assert set(exported) <= metrics.registered_names() | {
        n for n in exported if n.endswith("_created")}
    for expr in _exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        names = METRIC.findall(expr)
        assert names, f"a query that reads no sandqueue metric: {expr}"
        unknown = [n for n in names if n not in exported]
        assert unknown == [], f"{expr}: not exported: {unknown}"
        allowed = set().union(*(exported[n] for n in names)) | {"le"}
        used = set(SELECTOR_LABEL.findall(expr))
        for group in GROUPING.findall(expr):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        assert used <= allowed, f"{expr}: labels {used - allowed} are not on {names}"


def test_the_panels_the_issue_asks_for_and_every_metric_shown() -> None:
    exprs = " ".join(_exprs())
    assert "sandqueue_queue_depth" in exprs
    assert "rate(sandqueue_tasks_finished_total" in exprs  # throughput
    assert re.search(r"histogram_quantile\(0\.95, sum by \(le, phase\) "
                     r"\(rate\(sandqueue_phase_seconds_bucket", exprs)
    assert re.search(r"sum by \(error\) \(increase\(sandqueue_tasks_finished_total", exprs)
    assert re.search(r"sum by \(tenant\) \(increase\(sandqueue_cost_usd_total", exprs)
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in METRIC.findall(exprs)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n)
                for n in metrics.registered_names()}
    assert families - shown == set(), "exported but on no panel"
