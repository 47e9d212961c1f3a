"""Task records and leases in Redis: what a task's state is while it is not finished.

Celery's result backend holds the final `AgentResult`. This module holds what happens
before, and it survives a worker crash:

- `sq:task:<id>` (hash): status, attempt (counted across deliveries, so each sandbox's
  metadata names a unique attempt), deadline (kept from the first delivery), tool calls
  made so far (the side-effect rule reads it after a crash), last text, cost so far.
- `attempt_log:<n>` fields of the same hash: one JSON `AttemptRecord` per attempt, written
  when it starts and again when it ends. One field per attempt makes each write atomic and
  never a read-modify-write, so a delivery after a `kill -9` still sees the dead attempt
  (left `running`) and reports it as `worker_lost`; `reaped:<n>` notes the reaper's kill of
  that attempt's sandbox.
- `sq:running` (sorted set): task id -> lease expiry. A worker renews the leases of the
  tasks it runs every few seconds; a lease that expires means its worker died, and another
  worker hands the task back to the queue (`worker/broker/recovery.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from sandqueue import keys
from sandqueue.contract import FINAL_STATUSES, AttemptRecord, TaskStatus

ATTEMPT_FIELD = "attempt_log:"
REAPED_FIELD = "reaped:"

_IS_FINAL = " or ".join(f"status == '{status.value}'" for status in sorted(FINAL_STATUSES))
"""Lua: is `status` final? From the one definition of final statuses (sandqueue/contract.py)."""

# Back to the queue without a worker (stepped aside for a per-key limit), unless the task
# ended meanwhile (a producer cancelled it): a late "queued" must never hide "cancelled".
# KEYS: task. ARGV: field, value, now, ttl.
_REQUEUE = """
local status = redis.call('HGET', KEYS[1], 'status')
if FINAL_STATUSES then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', ARGV[1], ARGV[2], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
""".replace("FINAL_STATUSES", _IS_FINAL)

# A delivery begins, in one round trip. KEYS: task, running, owners.
# ARGV: task id, worker, now, deadline_s, ttl_s, lease expiry.
# {"final", status} for a finished task; {"busy", owner} while another worker holds a live
# lease; else takes the lease, counts the delivery and the first attempt, and returns
# {"ok", delivery, attempt, deadline_at, tool_calls, last_text, cost_usd, cancel}.
_BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if FINAL_STATUSES then
  return {'final', status}
end
local now = tonumber(ARGV[3])
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if score and tonumber(score) > now then
  local owner = redis.call('HGET', KEYS[3], ARGV[1])
  if owner and owner ~= ARGV[2] then return {'busy', owner} end
end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
redis.call('HSETNX', KEYS[1], 'deadline_at', tostring(now + tonumber(ARGV[4])))
local delivery = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'status', 'running', 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
local v = redis.call('HMGET', KEYS[1], 'deadline_at', 'tool_calls', 'last_text', 'cost_usd',
                     'cancel')
return {'ok', delivery, attempt, v[1], v[2] or '', v[3] or '', v[4] or '', v[5] or ''}
""".replace("FINAL_STATUSES", _IS_FINAL)

# Renew leases still owned by ARGV[1]. KEYS: running, owners. ARGV: me, expiry, ids...
# Returns the ids this worker no longer owns (recovered elsewhere while it was cut off).
_RENEW = """
local lost = {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Remove a lease held by ARGV[2]. KEYS: running, owners. ARGV: id, me.
_RELEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Remove a lease if it is expired. KEYS: running, owners. ARGV: id, now.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


# Note a reaped sandbox on its task's record, without creating a record that has expired.
# KEYS: task. ARGV: field, sandbox id.
_NOTE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Begin:
    """What a delivery finds when it starts."""

    deadline_at: float
    delivery: int
    attempt: int
    """The first attempt number of this delivery, already counted."""
    tool_calls: int
    last_text: str | None
    cost_usd: float
    cancel_requested: bool


@dataclass(frozen=True)
class NotMine:
    """This delivery must not run: the task finished, or another live worker runs it."""

    reason: str
    final_status: str | None = None
    """The status of a task that had already finished."""


class TaskStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._begin = client.register_script(_BEGIN)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._claim = client.register_script(_CLAIM)
        self._note = client.register_script(_NOTE)

    # -- producer side -----------------------------------------------------------------
    def mark_queued(self, task_id: str, submitted_at: float, pipe: Any) -> None:
        """Into the producer's submit pipeline."""
        key = keys.task(task_id)
        pipe.hset(key, mapping={"status": TaskStatus.QUEUED.value,
                                "submitted_at": submitted_at})
        pipe.expire(key, self.ttl_s)

    # -- worker side -------------------------------------------------------------------
    def begin(self, task_id: str, deadline_s: float, worker: str,
              lease_ttl_s: float) -> Begin | NotMine:
        """Start a delivery under a lease; the deadline is kept from the first delivery."""
        now = time.time()
        out = self._begin(keys=[keys.task(task_id), keys.RUNNING, keys.RUNNING_OWNERS],
                          args=[task_id, worker, now, deadline_s, self.ttl_s,
                                now + lease_ttl_s])
        verdict = as_text(out[0])
        if verdict == "final":
            return NotMine(f"the task has already finished ({as_text(out[1])})", as_text(out[1]))
        if verdict == "busy":
            return NotMine(f"the task is running on {as_text(out[1])}")
        delivery, attempt, deadline, calls, text, cost, cancel = out[1:]
        return Begin(
            deadline_at=float(deadline),
            delivery=int(delivery),
            attempt=int(attempt),
            tool_calls=int(as_text(calls) or 0),
            last_text=as_text(text) or None,
            cost_usd=float(as_text(cost) or 0.0),
            cancel_requested=bool(as_text(cancel)),
        )

    def requeued(self, task_id: str, field: str) -> bool:
        """Mark a task queued again (stamping `field` with the time) unless it has ended;
        False when it had."""
        return bool(self._requeue(keys=[keys.task(task_id)],
                                  args=[field, time.time(), time.time(), self.ttl_s]))

    def next_attempt(self, task_id: str) -> int:
        return int(self.r.hincrby(keys.task(task_id), "attempt", 1))

    def renew_leases(self, task_ids: list[str], worker: str, ttl_s: float) -> list[str]:
        """Extend this worker's leases; returns the ids whose lease it no longer holds."""
        if not task_ids:
            return []
        lost = self._renew(keys=[keys.RUNNING, keys.RUNNING_OWNERS],
                           args=[worker, time.time() + ttl_s, *task_ids])
        return [as_text(t) for t in lost]

    def claim_expired(self, task_id: str) -> bool:
        """Take an expired lease away from its (dead) owner; False if it is alive again."""
        return bool(self._claim(keys=[keys.RUNNING, keys.RUNNING_OWNERS],
                                args=[task_id, time.time()]))

    def has_live_lease(self, task_id: str) -> bool:
        score = self.r.zscore(keys.RUNNING, task_id)
        return score is not None and score > time.time()

    def release_lease(self, task_id: str, worker: str, pipe: Any = None) -> None:
        """Give the lease up, if this worker still holds it (another may have taken over)."""
        self._release(keys=[keys.RUNNING, keys.RUNNING_OWNERS], args=[task_id, worker],
                      client=pipe if pipe is not None else self.r)

    def record_tool_call(self, task_id: str, name: str) -> None:
        """Counted as it happens, so the side-effect rule also holds after a crash."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(keys.task(task_id), "tool_calls", 1)
        pipe.hincrby(keys.task(task_id), f"tool:{name}", 1)
        pipe.execute()

    def note_reaped(self, task_id: str, attempt: int, sandbox_id: str) -> None:
        """The reaper killed this attempt's sandbox: the task's attempt log says so."""
        self._note(keys=[keys.task(task_id)], args=[f"{REAPED_FIELD}{attempt}", sandbox_id])

    @staticmethod
    def attempt_log(record: dict[str, str]) -> list[AttemptRecord]:
        """The attempts recorded so far, in order, with the reaper's kills applied."""
        entries = []
        for name, value in record.items():
            if name.startswith(ATTEMPT_FIELD):
                entry = AttemptRecord.model_validate_json(value)
                reaped = record.get(f"{REAPED_FIELD}{entry.attempt}")
                if reaped and not entry.sandbox_killed and reaped == entry.sandbox_id:
                    entry.sandbox_killed, entry.killed_by = True, "reaper"
                entries.append(entry)
        return sorted(entries, key=lambda e: e.attempt)

    @staticmethod
    def attempt_values(entry: AttemptRecord) -> dict[str, str]:
        """The record field of one attempt (pass to `values()`/HSET)."""
        return {f"{ATTEMPT_FIELD}{entry.attempt}": entry.model_dump_json(exclude_none=True)}

    def tool_counts(self, record: dict[str, str]) -> dict[str, int]:
        return {k[5:]: int(v) for k, v in record.items() if k.startswith("tool:")}

    @staticmethod
    def values(**fields: Any) -> dict[str, Any]:
        """Record fields as stored: None skipped, statuses by value, `updated_at` stamped."""
        values = {k: (v.value if isinstance(v, TaskStatus) else v) for k, v in fields.items()
                  if v is not None}
        values["updated_at"] = time.time()
        return values

    def update(self, task_id: str, **fields: Any) -> None:
        """Set fields at once (None values are skipped); workers batch theirs instead."""
        key = keys.task(task_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping=self.values(**fields))
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def get(self, task_id: str) -> dict[str, str]:
        raw = self.r.hgetall(keys.task(task_id))
        return {as_text(k): as_text(v) for k, v in raw.items()}


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients may or may not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value
