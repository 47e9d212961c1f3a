"""Every Redis key sandqueue writes outside Celery's own, in one place.

All live under the `sq:` prefix so operators can find (and size) them with `SCAN sq:*`.
"""

from __future__ import annotations

PREFIX = "sq:"


def task(task_id: str) -> str:
    """Hash: status, attempt, timestamps, worker, sandbox id of one task."""
    return f"{PREFIX}task:{task_id}"


def idempotency(key: str) -> str:
    """String: the task id first submitted under this idempotency key."""
    return f"{PREFIX}idem:{key}"


def sim_sandbox(sandbox_id: str) -> str:
    """Hash: a live simulated sandbox (metadata as JSON, started/end timestamps)."""
    return f"{PREFIX}sim:sbx:{sandbox_id}"


SIM_LIVE = f"{PREFIX}sim:live"
"""Set of live simulated sandbox ids."""
SIM_CREATED = f"{PREFIX}sim:created"
SIM_KILLED = f"{PREFIX}sim:killed"

RUNNING = f"{PREFIX}running"
"""Sorted set: task id -> lease expiry (epoch seconds) of every task a worker is running."""
RUNNING_OWNERS = f"{PREFIX}running:owner"
"""Hash: task id -> name of the worker holding its lease."""
REAPER_LOCK = f"{PREFIX}lock:reaper"
RECOVER_LOCK = f"{PREFIX}lock:recover"


def events(task_id: str) -> str:
    """Stream: the task's progress events (bounded length, expires with the result)."""
    return f"{PREFIX}events:{task_id}"


WORKER_LIMITS = f"{PREFIX}workers:limits"
"""Hash: worker name -> JSON {queues, max_timeout_s, until, and its heartbeat: pid, host,
concurrency, in_flight, max_live_sandboxes, max_creates_per_s, beat_at}: what each live
worker enforces, so producers can warn about a deadline the workers will clamp, and what
`sandqueue/fleet.py` reports per worker."""

CANCELLED = f"{PREFIX}cancelled"
"""Sorted set: task id -> time cancellation was asked; workers poll it for their tasks."""


DEADLETTER = f"{PREFIX}deadletter"
"""List: broker messages workers refused as unreadable, kept for inspection."""


def batch(batch_id: str, suffix: str = "") -> str:
    """`sq:batch:<id>` (hash: meta, status, completion webhook), `:keys` (list, input
    order), `:items` (hash: input key -> current task id), `:gen` (hash: input key -> retry
    generation), `:open` (set: task ids not ended yet, for a batch with a callback_url;
    `sandqueue/batchdone.py`), `:tasks` (hash: input key -> the prepared task's JSON,
    secrets sealed; HTTP batches only, so the dashboard can run failed inputs again)."""
    return f"{PREFIX}batch:{batch_id}{':' + suffix if suffix else ''}"


BATCHES = f"{PREFIX}idx:batches"
"""Sorted set: batch id -> creation time of every batch (entries older than the results are
trimmed when a batch is registered): the dashboard's batch list reads it."""


LIMIT_PREFIX = f"{PREFIX}limit:"
LIMIT_SANDBOXES = f"{LIMIT_PREFIX}sandboxes"
"""Sorted set: live sandbox slots, fleet-wide (holder -> lease expiry)."""
LIMIT_RATE = f"{LIMIT_PREFIX}rate"
"""Hash: the creation-rate token bucket."""
LIMIT_COOLDOWN = f"{LIMIT_PREFIX}cooldown"
"""String with TTL: creations paused after a 429."""
LIMIT_SLOWDOWN = f"{LIMIT_PREFIX}slowdown"
"""String with TTL: creations at half rate after a 429."""
LIMIT_WAKE = f"{LIMIT_PREFIX}wake"
"""List: a nudge to waiters when a slot frees."""


def limit_key(kind: str, value: str) -> str:
    """Sorted set: running-task slots of one key (`label.tenant=acme`, a credential digest)."""
    return f"{LIMIT_PREFIX}key:{kind}:{value}"

def apikey(key_id: str) -> str:
    """Hash: one API key's sha256 hash (never the key), tenant, scopes, allowed env names,
    limits, created/last-used/expiry times, revoked flag (`producer/apikeys.py`)."""
    return f"{PREFIX}apikey:{key_id}"


def dashboard_session(token_hash: str) -> str:
    """Hash: a dashboard login (`key_id`, `created_at`), under the sha256 of the session
    token its cookie holds; expires with the cookie. Never the token or the API key."""
    return f"{PREFIX}dash:session:{token_hash}"


APIKEYS = f"{PREFIX}apikeys"
"""Set: the ids of every API key, for `sandqueue apikey list`."""


def tenant_index(tenant: str) -> str:
    """Sorted set: task id -> submit time of a tenant's tasks (entries older than the
    results are trimmed on each submit; the key expires with them). `GET /v1/tasks` reads it."""
    return f"{PREFIX}idx:tenant:{tenant}"


TASK_INDEX = f"{PREFIX}idx:all"
"""Sorted set: task id -> submit time of every task, a tenant's or one submitted without a
tenant from the CLI or Python (trimmed and expiring as the per-tenant indexes): what an
`admin` key's unfiltered `GET /v1/tasks` and the dashboard read."""


def submit_rate(tenant: str, window: int) -> str:
    """String: submits of a tenant in one rate-limit window (expires after it)."""
    return f"{PREFIX}rate:{tenant}:{window}"


def webhook(task_id: str) -> str:
    """Hash: a task's completion callback: URL, sealed secret, body, state, attempts
    (`worker/webhooks.py`); `<this key>:log` is the list of its attempts. Both expire with
    the result. A batch's completion is delivery `batch:<batch id>:<round>`."""
    return f"{PREFIX}webhook:{task_id}"


WEBHOOKS_DUE = f"{PREFIX}webhooks:due"
"""Sorted set: task id -> when its callback's next attempt is due (or its claim expires)."""


def tenant_open(tenant: str) -> str:
    """Sorted set: a tenant's tasks not finished yet (task id -> submit time), for the
    per-key `max_queued` limit. Added at submit, removed when a task ends; entries whose
    task ended unseen are pruned when the limit is checked."""
    return f"{PREFIX}open:tenant:{tenant}"


STATS_WINDOW_S = 10
"""Width of one fleet-wide counter window (`stats`)."""


def stats(name: str, window: int) -> str:
    """String: a fleet-wide counter (`creates`: sandboxes created, `rate_limited`: 429s) for
    one `STATS_WINDOW_S` window (epoch seconds // the width); expires after a few minutes.
    `sandqueue/fleet.py` sums the last minute's windows into a rate."""
    return f"{PREFIX}stats:{name}:{window}"


STATS_SUBMITTED = f"{PREFIX}stats:submitted"
"""Hash: tenant (`_none` without one) -> tasks submitted by every producer, ever (a counter:
no expiry; as many fields as tenants). `sandqueue serve` exports it as
`sandqueue_tasks_submitted_total`, the same figure whichever process is scraped."""
