"""A batch's completion webhook: decided once, in Redis, by whoever ends its last task.

Only batches with a `callback_url` are tracked. Their open tasks are a Redis set
(`sq:batch:<id>:open`): tasks are added as they are submitted (`track`, skipping any that
already ended) and removed as they end. Tasks end in these places: a worker finishing one
(`worker/webhooks.after_task`; recovery, for a worker that died before it could tell), a
producer cancelling a queued one (`Client.cancel_outcomes`), and `seal`, which a producer
calls once it has submitted everything it will (after a cancel too), which also sweeps out
tasks whose end nobody reported (a worker died between finishing and telling). Every path
runs the same Lua script, which removes the task and, when the batch is sealed and its set
is empty, claims the webhook with HSETNX on `fired` and records the delivery for the
worker's dispatcher in the same atomic step: several workers ending tasks at the same
instant cannot send it twice, and a producer dying right after the claim cannot lose it.

A resumed batch that submits new tasks (`--retry-failed`) opens a new round: `fired` is
cleared and its next completion is delivered again under a new delivery id
(`batch:<id>:<round>`). Posting a finished batch again submits nothing and sends nothing.

The body (`summary`) is built by the dispatcher at its first attempt, off the task threads,
and kept for the retries.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from sandqueue import keys
from sandqueue.contract import FINAL_STATUSES
from sandqueue.store import as_text

FINAL_CSV = ",".join(s.value for s in FINAL_STATUSES)

# KEYS: batch hash, open set. ARGV: task key prefix, final statuses (csv), ttl, batch id,
# task ids... Tracks the ids that have not ended; a new open task after the webhook fired
# starts a new round. Returns how many were added.
_TRACK = """
if not redis.call('HGET', KEYS[1], 'callback_url') then return 0 end
local final = {}
for s in string.gmatch(ARGV[2], '[^,]+') do final[s] = true end
local added = 0
for i = 5, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local status = redis.call('HGET', key, 'status')
  if status and not final[status] then
    added = added + redis.call('SADD', KEYS[2], ARGV[i])
    redis.call('HSET', key, 'batch', ARGV[4])
  end
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
if added > 0 and redis.call('HEXISTS', KEYS[1], 'fired') == 1 then
  redis.call('HDEL', KEYS[1], 'fired', 'sealed')
end
return added
"""

# KEYS: batch hash, open set, due deliveries. ARGV: mode (`task` or `seal`), task id, task
# key prefix, final statuses (csv), now, ttl, delivery key prefix, batch id.
# `task`: that task ended. `seal`: everything is submitted; drop ended tasks from the set.
# Returns the delivery id when this call completed the batch, else false.
_END = """
local b, open = KEYS[1], KEYS[2]
local now, ttl = ARGV[5], tonumber(ARGV[6])
if ARGV[1] == 'task' then
  if redis.call('SREM', open, ARGV[2]) == 0 then return false end
else
  if not redis.call('HGET', b, 'callback_url') then return false end
  redis.call('HSET', b, 'sealed', 1)
  local final = {}
  for s in string.gmatch(ARGV[4], '[^,]+') do final[s] = true end
  for _, id in ipairs(redis.call('SMEMBERS', open)) do
    local status = redis.call('HGET', ARGV[3] .. id, 'status')
    if not status or final[status] then redis.call('SREM', open, id) end
  end
end
if redis.call('HGET', b, 'sealed') ~= '1' or redis.call('SCARD', open) > 0 then
  return false
end
if redis.call('HGET', b, 'status') == 'running' then redis.call('HSET', b, 'status', 'done') end
local hook = redis.call('HMGET', b, 'callback_url', 'callback_secret')
if not hook[1] or not hook[2] then return false end
if redis.call('HSETNX', b, 'fired', now) == 0 then return false end
local round = redis.call('HINCRBY', b, 'rounds', 1)
redis.call('HSET', b, 'ended_at', now)
local id = 'batch:' .. ARGV[8] .. ':' .. round
local key = ARGV[7] .. id
redis.call('HSET', key, 'url', hook[1], 'secret', hook[2], 'state', 'pending',
           'attempts', 0, 'first_at', now, 'batch', ARGV[8])
redis.call('EXPIRE', key, ttl)
redis.call('ZADD', KEYS[3], now, id)
return id
"""


def _script(r: Any, name: str, source: str) -> Any:
    """One registered script per client (registering hashes the source each time)."""
    cache: dict[str, Any] = r.__dict__.setdefault("_sq_batchdone", {})
    if name not in cache:
        cache[name] = r.register_script(source)
    return cache[name]


def track(r: Any, batch_id: str, task_ids: list[str], ttl_s: int, *, client: Any = None) -> Any:
    """Count `task_ids` as the batch's open tasks (those not ended yet); into `client` (a
    pipeline) when given. Does nothing for a batch without a callback."""
    if not task_ids:
        return 0
    return _script(r, "track", _TRACK)(
        keys=[keys.batch(batch_id), keys.batch(batch_id, "open")],
        args=[keys.task(""), FINAL_CSV, ttl_s, batch_id, *task_ids], client=client or r)


def _end(r: Any, batch_id: str, mode: str, task_id: str, ttl_s: int) -> str | None:
    out = _script(r, "end", _END)(
        keys=[keys.batch(batch_id), keys.batch(batch_id, "open"), keys.WEBHOOKS_DUE],
        args=[mode, task_id, keys.task(""), FINAL_CSV, time.time(), ttl_s, keys.webhook(""),
              batch_id])
    return as_text(out) if out else None


def task_ended(r: Any, batch_id: str, task_id: str, ttl_s: int) -> str | None:
    """A task of the batch reached a final status. Returns the delivery id when this
    ended the batch (its webhook is then due), else None."""
    return _end(r, batch_id, "task", task_id, ttl_s)


def seal(r: Any, batch_id: str, ttl_s: int) -> str | None:
    """Everything this run will submit is submitted (or the batch was cancelled): the batch
    completes once its open tasks have ended, perhaps now. Returns the delivery id if so."""
    return _end(r, batch_id, "seal", "", ttl_s)


def summary(r: Any, batch_id: str) -> dict[str, Any]:
    """The webhook's body: the batch's counts by status, cost, times and where its results
    are. Read from the task records, so it is the same whoever ended the batch."""
    meta = {as_text(k): as_text(v) for k, v in r.hgetall(keys.batch(batch_id)).items()}
    items = [as_text(t) for t in r.hvals(keys.batch(batch_id, "items"))]
    by_status: Counter[str] = Counter()
    cost = 0.0
    for start in range(0, len(items), 2000):
        pipe = r.pipeline(transaction=False)
        for task_id in items[start:start + 2000]:
            pipe.hmget(keys.task(task_id), "status", "cost_usd")
        for status, spent in pipe.execute():
            by_status[as_text(status) if status else "unknown"] += 1
            cost += float(spent) if spent else 0.0
    total = int(meta.get("total") or len(items))
    if total > len(items):
        by_status["unsubmitted"] = total - len(items)

    def number(name: str) -> float | None:
        return float(meta[name]) if meta.get(name) else None

    return {"event": "batch.completed", "batch_id": batch_id,
            "status": meta.get("status") or "done", "reason": meta.get("reason") or None,
            "total": total, "by_status": dict(by_status), "cost_usd": round(cost, 6),
            "created_at": number("created_at"), "ended_at": number("ended_at"),
            "round": int(meta.get("rounds") or 1), "source": meta.get("source") or None,
            "results": {"http": f"/v1/batches/{batch_id}/results",
                        "cli": f"sandqueue batch results {batch_id}",
                        "file": meta.get("out") or None}}
