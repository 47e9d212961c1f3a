"""A read-only snapshot of the fleet, from what workers and producers already keep in Redis.

For the dashboard's fleet page and the fleet-wide Prometheus gauges (one scrape, one
snapshot). It costs three pipelined round trips and never walks the keyspace: every key it
reads is named in `sandqueue/keys.py`, and the only reads that grow with the fleet are
bounded (`MAX_RUNNING` running tasks, `MAX_TENANTS` API keys).

Where each figure comes from:
- workers: their heartbeat in `sq:workers:limits` (rewritten every 10 s by each worker's
  maintenance thread: queues, concurrency, in-flight count, the limits it enforces), and
  their live leases in `sq:running` / `sq:running:owner` (exact at the moment of reading).
- sandboxes: live slots in `sq:limit:sandboxes` against the cap the workers enforce. Slots
  are only taken when a cap is in force (always with E2B: 20 by default); with the
  simulator and no cap, the simulator's own set of live sandboxes is counted instead.
- creations: fleet-wide counters per 10-second window (`sq:stats:creates:*`,
  `sq:stats:rate_limited:*`, written by workers) over the last minute, the rate limit the
  workers enforce, and the cool-down a 429 started (`sq:limit:cooldown`, `sq:limit:slowdown`).
- queues: the Celery lists (kombu's Redis transport: one list per queue and priority step,
  new messages pushed on the left, taken from the right), so the oldest waiting message is
  the last element; its age is read from its `submitted_at`.
- tenants: those of the API keys, of running tasks and of the producers' submit counter
  (`sq:stats:submitted`: tenant -> tasks submitted, `_none` for tasks without one); at most
  `MAX_TENANTS`, those with the most submitted first. Running = running tasks whose record
  names the tenant; queued = the tenant's unfinished tasks (`sq:open:tenant:<t>`, kept by
  submit, cancel and the worker) minus those running.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from typing import Any

import redis
from pydantic import BaseModel, Field

from sandqueue import keys
from sandqueue.store import as_text

MAX_RUNNING = 5000
"""Running tasks whose tenant is looked up; beyond it the per-tenant figures are partial."""
MAX_TENANTS = 500
"""API keys read, and tenants reported."""
RATE_WINDOWS = 6
"""Counter windows summed into the creation rate (the last minute)."""
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps priority n of queue q in the list `q\\x06\\x16n` (n > 0)."""
DEFAULT_QUEUE = "sandqueue"


class WorkerInfo(BaseModel):
    name: str
    host: str | None = None
    pid: int | None = None
    queues: list[str] = Field(default_factory=list)
    concurrency: int | None = None
    in_flight: int = 0
    """Tasks this worker holds a live lease on, now."""
    heartbeat_in_flight: int | None = None
    """Tasks it was running at its last heartbeat (up to 10 s old)."""
    heartbeat_age_s: float | None = None
    max_timeout_s: float | None = None


class SandboxInfo(BaseModel):
    live: int
    cap: int | None = None
    """The fleet-wide cap the workers enforce (the lowest advertised); None = no cap."""
    counted_by: str
    """`slots` (the fleet cap's lease set) or `sim` (the simulator's own set)."""


class CreationInfo(BaseModel):
    per_s: float
    """Sandbox creations per second over the last minute, fleet-wide."""
    limit_per_s: float | None = None
    rate_limited_last_min: int = 0
    """429 answers (E2B or the model) in the last minute."""
    cooldown_s: float = 0.0
    """Creations are paused for this long still (a 429 said so)."""
    slowed: bool = False
    """Creations run at half rate (for a minute after a 429)."""


class QueueInfo(BaseModel):
    name: str
    depth: int
    oldest_age_s: float | None = None


class TenantInfo(BaseModel):
    tenant: str
    running: int
    queued: int
    submitted: int = 0
    """Tasks submitted under this tenant by every producer, ever (`_none`: without one)."""


class FleetSnapshot(BaseModel):
    taken_at: float
    workers: list[WorkerInfo]
    sandboxes: SandboxInfo
    creations: CreationInfo
    queues: list[QueueInfo]
    tenants: list[TenantInfo]
    running: int
    """Tasks with a live lease, fleet-wide."""
    partial: bool = False
    """More than MAX_RUNNING tasks run: per-tenant running counts cover only some."""


def fleet_snapshot(client: redis.Redis, *, queues: list[str] | None = None,
                   now: float | None = None) -> FleetSnapshot:
    """The fleet as Redis sees it now. `queues` adds queue names to those the live workers
    consume (and the default `sandqueue`), e.g. a queue no worker serves yet."""
    now = time.time() if now is None else now
    first = _first_round(client, now)
    advertised = {q for entry in _live_entries(first["limits"], now).values()
                  for q in entry.get("queues") or []}
    queue_names = sorted({DEFAULT_QUEUE, *(queues or []), *advertised})
    second = _second_round(client, queue_names, first["running_ids"], first["apikeys"])
    workers = _workers(first["limits"], second["owners"], now)
    tenant_running = Counter(t for t in second["running_tenants"] if t)
    submitted = first["submitted"]
    names = sorted(set(second["apikey_tenants"]) | set(tenant_running) | set(submitted))
    names = names if len(names) <= MAX_TENANTS else sorted(
        names, key=lambda t: -submitted.get(t, 0))[:MAX_TENANTS]
    third = _third_round(client, names, second["tails"])
    tenants = [TenantInfo(tenant=t, running=tenant_running[t], submitted=submitted.get(t, 0),
                          queued=max(0, third["open"][t] - tenant_running[t])) for t in names]
    return FleetSnapshot(
        taken_at=now, workers=workers,
        sandboxes=_sandboxes(first), creations=_creations(first),
        queues=_queues(queue_names, second["depths"], third["oldest"], now),
        tenants=tenants, running=int(first["running_total"]),
        partial=first["running_total"] > MAX_RUNNING)


def _first_round(client: redis.Redis, now: float) -> dict[str, Any]:
    window = int(now // keys.STATS_WINDOW_S)
    windows = range(window - RATE_WINDOWS + 1, window + 1)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.WORKER_LIMITS)
    pipe.zrangebyscore(keys.RUNNING, now, "+inf", start=0, num=MAX_RUNNING)
    pipe.zcount(keys.RUNNING, now, "+inf")
    pipe.zcount(keys.LIMIT_SANDBOXES, now, "+inf")
    pipe.scard(keys.SIM_LIVE)
    pipe.pttl(keys.LIMIT_COOLDOWN)
    pipe.exists(keys.LIMIT_SLOWDOWN)
    pipe.mget([keys.stats("creates", w) for w in windows])
    pipe.mget([keys.stats("rate_limited", w) for w in windows])
    pipe.srandmember(keys.APIKEYS, MAX_TENANTS)
    pipe.hgetall(keys.STATS_SUBMITTED)
    (limits, running, running_total, slots, sim_live, cooldown, slowed, creates, limited,
     apikeys, submitted) = pipe.execute()
    return {"now": now, "limits": limits, "running_ids": [as_text(t) for t in running],
            "running_total": running_total, "slots": slots, "sim_live": sim_live,
            "cooldown_ms": cooldown,
            "slowed": bool(slowed), "creates": _total(creates), "limited": _total(limited),
            "elapsed_s": (RATE_WINDOWS - 1) * keys.STATS_WINDOW_S + now % keys.STATS_WINDOW_S,
            "apikeys": [as_text(k) for k in apikeys or []],
            "submitted": {as_text(t): int(n) for t, n in submitted.items()}}


def _total(values: list[Any]) -> int:
    return sum(int(v) for v in values if v is not None)


def _second_round(client: redis.Redis, queue_names: list[str], running_ids: list[str],
                  key_ids: list[str]) -> dict[str, Any]:
    """Lease owners, queue lengths and tails, the tenant of each running task and of each
    API key."""
    lists = [(q, _priority_list(q, p)) for q in queue_names for p in KOMBU_PRIORITY_STEPS]
    pipe = client.pipeline(transaction=False)
    if running_ids:
        pipe.hmget(keys.RUNNING_OWNERS, running_ids)
    for _, name in lists:
        pipe.llen(name)
        pipe.lindex(name, -1)
    for task_id in running_ids:
        pipe.hget(keys.task(task_id), "tenant")
    for key_id in key_ids:
        pipe.hget(keys.apikey(key_id), "tenant")
    out = pipe.execute()
    owners, out = (out[0], out[1:]) if running_ids else ([], out)
    depths: Counter[str] = Counter()
    tails: dict[str, list[Any]] = {q: [] for q in queue_names}
    for i, (queue, _) in enumerate(lists):
        depths[queue] += int(out[2 * i])
        if out[2 * i + 1] is not None:
            tails[queue].append(out[2 * i + 1])
    rest = out[2 * len(lists):]
    return {"owners": owners, "depths": depths, "tails": tails,
            "running_tenants": [as_text(t) if t else None for t in rest[:len(running_ids)]],
            "apikey_tenants": sorted({as_text(t) for t in rest[len(running_ids):] if t})}


def _priority_list(queue: str, priority: int) -> str:
    return f"{queue}{KOMBU_PRIORITY_SEP}{priority}" if priority else queue


def _third_round(client: redis.Redis, tenants: list[str],
                 tails: dict[str, list[Any]]) -> dict[str, Any]:
    """Open tasks per tenant, and the submit time of each queue's oldest message (from the
    message itself, else from its task record)."""
    oldest: dict[str, float | None] = {}
    lookups: list[tuple[str, str]] = []
    for queue, messages in tails.items():
        times = [t for t in (_submitted_at(m) for m in messages) if t is not None]
        oldest[queue] = min(times) if times else None
        if oldest[queue] is None:
            lookups += [(queue, tid) for tid in (_task_id(m) for m in messages) if tid]
    pipe = client.pipeline(transaction=False)
    for tenant in tenants:
        pipe.zcard(keys.tenant_open(tenant))
    for _, task_id in lookups:
        pipe.hget(keys.task(task_id), "submitted_at")
    out = pipe.execute() if tenants or lookups else []
    open_counts = Counter({t: int(n) for t, n in zip(tenants, out, strict=False)})
    for (queue, _), at in zip(lookups, out[len(tenants):], strict=True):
        if at is not None:
            value = float(as_text(at))
            current = oldest[queue]
            oldest[queue] = value if current is None else min(current, value)
    return {"open": open_counts, "oldest": oldest}


def _envelope(raw: Any) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return message if isinstance(message, dict) else None


def _task_id(raw: Any) -> str | None:
    message = _envelope(raw)
    headers = message.get("headers") if message else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def _submitted_at(raw: Any) -> float | None:
    """`submitted_at` of the sandqueue task in a kombu message (protocol 2: the body is
    `[args, kwargs, embed]`, base64-encoded), or None when it is not one."""
    message = _envelope(raw)
    if message is None:
        return None
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return float(args[0]["submitted_at"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _live_entries(limits: dict[Any, Any], now: float) -> dict[str, dict[str, Any]]:
    """Worker name -> heartbeat, for workers not gone quiet (their entries are pruned by
    the next live worker's heartbeat)."""
    entries = {}
    for raw_name, raw in limits.items():
        entry = _envelope(raw) or {}
        try:
            if float(entry.get("until") or 0) >= now:
                entries[as_text(raw_name)] = entry
        except (TypeError, ValueError):
            continue
    return entries


def _workers(limits: dict[Any, Any], owners: list[Any], now: float) -> list[WorkerInfo]:
    leases = Counter(as_text(o) for o in owners if o is not None)
    found: dict[str, WorkerInfo] = {}
    for name, entry in _live_entries(limits, now).items():
        beat = entry.get("beat_at")
        found[name] = WorkerInfo(
            name=name, host=entry.get("host"), pid=entry.get("pid"),
            queues=list(entry.get("queues") or []), concurrency=entry.get("concurrency"),
            heartbeat_in_flight=entry.get("in_flight"),
            heartbeat_age_s=round(now - float(beat), 3) if beat is not None else None,
            max_timeout_s=entry.get("max_timeout_s"))
    for name, count in leases.items():  # a worker with leases but no heartbeat yet
        found.setdefault(name, WorkerInfo(name=name)).in_flight = count
    return [found[n] for n in sorted(found)]


def _advertised(first: dict[str, Any], field: str) -> float | None:
    values = [v for v in (e.get(field) for e in _live_entries(first["limits"],
                                                              first["now"]).values())
              if isinstance(v, int | float)]
    return min(values) if values else None


def _sandboxes(first: dict[str, Any]) -> SandboxInfo:
    cap = _advertised(first, "max_live_sandboxes")
    if cap is None and first["sim_live"]:
        return SandboxInfo(live=int(first["sim_live"]), cap=None, counted_by="sim")
    return SandboxInfo(live=int(first["slots"]), cap=int(cap) if cap is not None else None,
                       counted_by="slots")


def _creations(first: dict[str, Any]) -> CreationInfo:
    cooldown_ms = int(first["cooldown_ms"])
    return CreationInfo(
        per_s=round(first["creates"] / max(1.0, first["elapsed_s"]), 3),
        limit_per_s=_advertised(first, "max_creates_per_s"),
        rate_limited_last_min=first["limited"],
        cooldown_s=cooldown_ms / 1000 if cooldown_ms > 0 else 0.0,
        slowed=first["slowed"])


def _queues(names: list[str], depths: Counter[str], oldest: dict[str, float | None],
            now: float) -> list[QueueInfo]:
    return [QueueInfo(name=q, depth=depths[q],
                      oldest_age_s=(round(max(0.0, now - at), 3)
                                    if (at := oldest.get(q)) is not None and depths[q] else None))
            for q in names]
