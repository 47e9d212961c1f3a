"""Prometheus metrics: every metric sandqueue exports, defined in this one module.

Two kinds, so that nothing is counted twice when every process is scraped:
- per process (counters, histograms, the in-flight gauge): each worker process counts what
  it ran, `sandqueue serve` what it accepted. Prometheus sums them across targets.
- fleet-wide figures (queue depth, oldest queued task, live sandboxes, creation rate,
  per-worker in-flight, per-tenant running/queued, and tasks submitted, which every
  producer counts in Redis): read from Redis at scrape time (`sandqueue/fleet.py`) by
  `FleetCollector`, which only `sandqueue serve` registers. Every serve process (uvicorn
  `--workers`, replicas) reports the same values: aggregate them with max(), not sum().

Label values are bounded: statuses, error categories, phases and outcomes are fixed sets;
tenants are capped per process (`SANDQUEUE_METRICS_MAX_TENANTS`, the rest count as
`_other`); worker names are the fleet's; a task id is never a label.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
"""Our metrics only (no process/platform collectors: the endpoint says what sandqueue does)."""

PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
"""Seconds: a sandbox starts in under a second to a few, an agent runs for minutes."""

TASKS_FINISHED = Counter(
    "sandqueue_tasks_finished", "Tasks that ended on this worker, by final status and error "
    "category ('' when it succeeded)", ["status", "error"], registry=REGISTRY)
ATTEMPTS = Counter(
    "sandqueue_attempts", "Attempts (each in a fresh sandbox) that ended, by outcome "
    "(succeeded, an error category, handed_back, worker_lost) and whether the task was "
    "retried after it", ["outcome", "retried"], registry=REGISTRY)
PHASE_SECONDS = Histogram(
    "sandqueue_phase_seconds", "Time per phase: queued (submit to a worker's start), "
    "sandbox_create, gateway_ready, agent_run (per attempt), total (worker start to result)",
    ["phase"], buckets=PHASE_BUCKETS, registry=REGISTRY)
COST_USD = Counter(
    "sandqueue_cost_usd", "Model cost of finished tasks in US dollars, by tenant", ["tenant"],
    registry=REGISTRY)
TOKENS = Counter(
    "sandqueue_tokens", "Model tokens of finished tasks, by tenant and kind (input, output, "
    "cache_read, cache_creation)", ["tenant", "kind"], registry=REGISTRY)
SANDBOX_CREATIONS = Counter(
    "sandqueue_sandbox_creations", "Sandboxes this worker created", registry=REGISTRY)
RATE_LIMITED = Counter(
    "sandqueue_rate_limited", "Attempts that ended on a 429 (E2B or the model)",
    registry=REGISTRY)
IN_FLIGHT = Gauge(
    "sandqueue_tasks_in_flight", "Tasks this worker process runs now", registry=REGISTRY)
WEBHOOK_DELIVERIES = Counter(
    "sandqueue_webhook_deliveries", "Callback delivery attempts by outcome (delivered, retry, "
    "failed, refused)", ["outcome"], registry=REGISTRY)

TOKEN_KINDS = {"input_tokens": "input", "output_tokens": "output",
               "cache_read_input_tokens": "cache_read",
               "cache_creation_input_tokens": "cache_creation"}
"""Usage fields of Claude Code's result (and the Anthropic API) -> the `kind` label."""

OTHER_TENANT = "_other"
NO_TENANT = "_none"


class TenantLabels:
    """At most `limit` distinct tenant label values per process; later ones are `_other`."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str | None) -> str:
        if not tenant:
            return NO_TENANT
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self.limit:
                self._seen.add(tenant)
                return tenant
        return OTHER_TENANT


tenant_label = TenantLabels()
"""This process's cap (set from the settings by whoever starts the metrics endpoint)."""


class FleetCollector(Collector):
    """Fleet-wide gauges, read from Redis when Prometheus scrapes (one snapshot a scrape).

    A Redis error (or anything unreadable) yields `sandqueue_fleet_up 0` and no fleet gauge,
    rather than failing the whole scrape (the per-process metrics still come through)."""

    def __init__(self, client: Callable[[], redis.Redis]) -> None:
        self._client = client

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are dynamic per scrape: do not describe at registration

    def collect(self) -> Iterator[Metric]:
        from sandqueue.fleet import fleet_snapshot

        up = GaugeMetricFamily("sandqueue_fleet_up", "1 when the fleet could be read from "
                               "Redis at this scrape")
        try:
            snap = fleet_snapshot(self._client())
        except redis.RedisError as e:
            log.warning("metrics: could not read the fleet from Redis: %s", e)
            up.add_metric([], 0)
            yield up
            return
        except Exception:  # a malformed record must not fail the whole scrape either
            log.exception("metrics: could not read the fleet")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from fleet_metrics(snap)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def fleet_metrics(snap: Any) -> Iterator[Metric]:
    """The gauges of one `FleetSnapshot`."""
    depth = _gauge("sandqueue_queue_depth", "Messages waiting in a queue", ["queue"])
    oldest = _gauge("sandqueue_queue_oldest_age_seconds", "Age of the oldest waiting task "
                    "(0 when the queue is empty)", ["queue"])
    for q in snap.queues:
        depth.add_metric([q.name], q.depth)
        oldest.add_metric([q.name], q.oldest_age_s or 0.0)
    workers = _gauge("sandqueue_fleet_workers", "Live workers (heartbeat or lease)")
    workers.add_metric([], len(snap.workers))
    in_flight = _gauge("sandqueue_fleet_worker_in_flight", "Tasks a worker holds a live lease "
                       "on", ["worker"])
    concurrency = _gauge("sandqueue_fleet_worker_concurrency", "A worker's slots", ["worker"])
    for w in snap.workers:
        in_flight.add_metric([w.name], w.in_flight)
        if w.concurrency is not None:
            concurrency.add_metric([w.name], w.concurrency)
    yield from (depth, oldest, workers, in_flight, concurrency)
    yield from _sandbox_metrics(snap)
    yield from _tenant_metrics(snap)


def _sandbox_metrics(snap: Any) -> Iterator[Metric]:
    running = _gauge("sandqueue_fleet_running_tasks", "Tasks with a live lease, fleet-wide")
    running.add_metric([], snap.running)
    live = _gauge("sandqueue_live_sandboxes", "Sandboxes alive now, fleet-wide")
    live.add_metric([], snap.sandboxes.live)
    yield from (running, live)
    if snap.sandboxes.cap is not None:
        cap = _gauge("sandqueue_live_sandboxes_cap", "The fleet's cap on live sandboxes")
        cap.add_metric([], snap.sandboxes.cap)
        yield cap
    rate = _gauge("sandqueue_sandbox_creations_per_second", "Sandbox creations per second "
                  "over the last minute, fleet-wide")
    rate.add_metric([], snap.creations.per_s)
    limited = _gauge("sandqueue_rate_limited_last_minute", "429 answers in the last minute, "
                     "fleet-wide")
    limited.add_metric([], snap.creations.rate_limited_last_min)
    cooldown = _gauge("sandqueue_create_cooldown_seconds", "Creations paused after a 429 for "
                      "this long still")
    cooldown.add_metric([], snap.creations.cooldown_s)
    yield from (rate, limited, cooldown)
    if snap.creations.limit_per_s is not None:
        limit = _gauge("sandqueue_sandbox_creations_limit_per_second", "The fleet's creation "
                       "rate limit")
        limit.add_metric([], snap.creations.limit_per_s)
        yield limit


def _tenant_metrics(snap: Any) -> Iterator[Metric]:
    running = _gauge("sandqueue_tenant_running", "A tenant's running tasks", ["tenant"])
    queued = _gauge("sandqueue_tenant_queued", "A tenant's tasks not finished and not running",
                    ["tenant"])
    submitted = CounterMetricFamily("sandqueue_tasks_submitted", "Tasks submitted by every "
                                    "producer, by tenant (counted in Redis)", labels=["tenant"])
    # the busiest tenants by name, the rest summed: the label stays bounded
    ranked = sorted(snap.tenants, key=lambda t: (-t.submitted, -t.running - t.queued))
    kept, rest = ranked[: tenant_label.limit], ranked[tenant_label.limit:]
    for t in kept:
        running.add_metric([t.tenant], t.running)
        queued.add_metric([t.tenant], t.queued)
        submitted.add_metric([t.tenant], t.submitted)
    if rest:
        running.add_metric([OTHER_TENANT], sum(t.running for t in rest))
        queued.add_metric([OTHER_TENANT], sum(t.queued for t in rest))
        submitted.add_metric([OTHER_TENANT], sum(t.submitted for t in rest))
    yield from (running, queued, submitted)


FLEET_METRIC_NAMES = frozenset({
    "sandqueue_fleet_up", "sandqueue_queue_depth", "sandqueue_queue_oldest_age_seconds",
    "sandqueue_fleet_workers", "sandqueue_fleet_worker_in_flight",
    "sandqueue_fleet_worker_concurrency", "sandqueue_fleet_running_tasks",
    "sandqueue_live_sandboxes", "sandqueue_live_sandboxes_cap",
    "sandqueue_sandbox_creations_per_second", "sandqueue_rate_limited_last_minute",
    "sandqueue_create_cooldown_seconds", "sandqueue_sandbox_creations_limit_per_second",
    "sandqueue_tenant_running", "sandqueue_tenant_queued", "sandqueue_tasks_submitted",
})
"""The fleet gauges' names (a test checks the collector yields exactly these)."""


def registered_names() -> set[str]:
    """Every series name sandqueue exports, as a query spells it (`_total`, `_bucket`, ...):
    what the Grafana dashboard may reference."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                                 "_created"),
                "gauge": ("",)}
    names: set[str] = set(FLEET_METRIC_NAMES) | {"sandqueue_tasks_submitted_total"}
    for family in REGISTRY.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def render(fleet: FleetCollector | None = None) -> bytes:
    """The text exposition: this process's metrics, then the fleet's if given."""
    text = generate_latest(REGISTRY)
    if fleet is not None:
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(fleet)
        text += generate_latest(scrape)
    return text
