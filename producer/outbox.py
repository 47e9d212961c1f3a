"""Submitting safely: claim, record and publish a task so that a crash at any point loses
nothing and runs nothing twice.

A submit is three writes: bind the idempotency key to a task id, record the task, publish
its Celery message. A producer can die (Ctrl-C, kill -9, Redis cut off) between any two.
So the first two are one atomic step (`claim`): the key is bound *and* the task recorded as
`submitting`, with the message body kept in the record while it is unconfirmed. Then the
message is published, then `confirm` moves the record to `queued` and drops the body.

Whoever submits the same key later (a batch resume, an app retrying) finds the record:
- still `submitting`: the first producer may have died before publishing, so the message is
  published again (`republish`). If the first copy did go out, the worker's delivery guard
  (`TaskStore.begin`: final or leased tasks are not run again) drops the second copy;
- any other status: the same task (`dup`), nothing is published;
- a different task under the same key: `conflict`, an error naming the existing task;
- a key with no record at all (claimed by an older producer that died before recording):
  taken over by the new task, which is recorded and published.
A chunk with any conflict claims nothing.

`cancel` ends a task that no worker holds (queued, submitting, handed back) at once, so a
task cancelled on a queue no worker serves does not sit in `queued` forever; the worker that
later receives its message finds it final and drops it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis

from sandqueue import keys
from sandqueue.contract import FINAL_STATUSES, AgentTask
from sandqueue.sealing import is_sealed
from sandqueue.store import as_text

_FINAL = [s.value for s in FINAL_STATUSES]

TENANT_LABEL = "tenant"
"""The label that names a task's tenant. The HTTP API sets it from the caller's API key (a
caller cannot choose it); the claim records it in the task hash (`tenant`) and indexes the
task under it, in the same atomic step, so no task is ever visible without its owner."""

# ARGV: now, ttl, task key prefix, tenant index prefix, tenant open-set prefix, then 7 per
# task: id, idempotency key (or ''), fingerprint, message body (JSON), queue, tenant (or ''),
# labels (JSON).
# KEYS: the index of every task (admin listings).
# Returns one {verdict, id[, body, queue]} per task. Every task is recorded with its labels
# (what `GET /v1/tasks` and the dashboard filter on) and indexed in the all-tasks index; a
# task with a tenant is also recorded with it and indexed under that tenant.
_CLAIM = """
local now, ttl, prefix, idx, openp = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4],
  ARGV[5]
local n = (#ARGV - 5) / 7
local verdicts, claimed, conflict, added = {}, {}, false, false
for i = 0, n - 1 do
  local b = 6 + i * 7
  local id, idem, fp = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  local v = {'new', id}
  if idem ~= '' then
    local here = claimed[idem]
    local bound = here and here[1] or redis.call('GET', idem)
    if here then
      v = (here[2] == fp) and {'dup', bound} or {'conflict', bound}
    elseif bound then
      local rec = redis.call('HMGET', prefix .. bound, 'status', 'fingerprint', 'message',
                             'queue')
      if rec[1] then
        if rec[2] and rec[2] ~= fp then v = {'conflict', bound}
        elseif rec[1] == 'submitting' and rec[3] then v = {'republish', bound, rec[3], rec[4]}
        else v = {'dup', bound} end
      end
    end
    if v[1] == 'new' then claimed[idem] = {id, fp} end
  end
  if v[1] == 'conflict' then conflict = true end
  verdicts[i + 1] = v
end
if conflict then return verdicts end
for i = 0, n - 1 do
  local b = 6 + i * 7
  if verdicts[i + 1][1] == 'new' then
    local id, idem = ARGV[b], ARGV[b + 1]
    local key = prefix .. id
    redis.call('HSET', key, 'status', 'submitting', 'submitted_at', now,
               'fingerprint', ARGV[b + 2])
    if idem ~= '' then
      redis.call('SET', idem, id, 'EX', ttl)
      redis.call('HSET', key, 'message', ARGV[b + 3], 'queue', ARGV[b + 4])
    end
    local tenant = ARGV[b + 5]
    redis.call('HSET', key, 'labels', ARGV[b + 6])
    redis.call('ZADD', KEYS[1], now, id)
    added = true
    if tenant ~= '' then
      redis.call('HSET', key, 'tenant', tenant)
      redis.call('ZADD', idx .. tenant, now, id)
      redis.call('ZADD', openp .. tenant, now, id)
      redis.call('EXPIRE', openp .. tenant, ttl)
      redis.call('ZREMRANGEBYSCORE', idx .. tenant, '-inf', tonumber(now) - ttl)
      redis.call('EXPIRE', idx .. tenant, ttl)
    end
    redis.call('EXPIRE', key, ttl)
  end
end
if added then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now) - ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
end
return verdicts
"""

# ARGV: task key prefix, ids... A worker may already have begun a task: only `submitting`
# becomes `queued`. The kept message body is dropped either way.
_CONFIRM = """
for i = 2, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  if redis.call('HGET', key, 'status') == 'submitting' then
    redis.call('HSET', key, 'status', 'queued')
  end
  redis.call('HDEL', key, 'message')
end
return 1
"""

# KEYS: running, cancelled. ARGV: now, ttl, task key prefix, final statuses (csv), tenant
# open-set prefix, ids...
# Per id: {'ended', status} (already final), {'cancelled'} (nobody held it: final now),
# {'requested'} (a worker runs it and stops it), {'unknown'} (no record).
_CANCEL = """
local now, ttl, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local final = {}
for s in string.gmatch(ARGV[4], '[^,]+') do final[s] = true end
local out = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  local status = redis.call('HGET', key, 'status')
  local lease = redis.call('ZSCORE', KEYS[1], id)
  if not status then
    out[#out + 1] = {'unknown'}
  elseif final[status] then
    out[#out + 1] = {'ended', status}
  elseif (status == 'queued' or status == 'submitting')
         and not (lease and tonumber(lease) > now) then
    redis.call('HSET', key, 'status', 'cancelled', 'cancel', 1, 'error', 'cancelled',
               'updated_at', now)
    redis.call('HDEL', key, 'message')
    redis.call('EXPIRE', key, ttl)
    local tenant = redis.call('HGET', key, 'tenant')
    if tenant then redis.call('ZREM', ARGV[5] .. tenant, id) end
    out[#out + 1] = {'cancelled'}
  else
    redis.call('HSET', key, 'cancel', 1)
    redis.call('EXPIRE', key, ttl)
    redis.call('ZADD', KEYS[2], now, id)
    out[#out + 1] = {'requested'}
  end
end
return out
"""


@dataclass(frozen=True)
class Claim:
    """What `claim` decided for one task."""

    verdict: str
    """`new` (recorded, to publish), `dup` (an earlier task, nothing to do), `republish`
    (an earlier task never confirmed: publish it again) or `conflict`."""
    task_id: str
    body: dict[str, Any] | None = None
    queue: str | None = None


class IdempotencyConflict(Exception):
    """An idempotency key is bound to a different task; nothing of the chunk was claimed."""

    def __init__(self, conflicts: dict[str, str]) -> None:
        self.conflicts = conflicts  # idempotency key -> existing task id
        super().__init__(conflicts)


def fingerprint(task: AgentTask) -> str:
    """What makes two submits "the same task": every field but the idempotency key.
    Sealed values are encrypted with a fresh IV each time, so they count by position
    only (a changed token under the same key is still the same task)."""

    def mask(value: Any) -> Any:
        if is_sealed(value):
            return "<sealed>"
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    data = mask(task.model_dump(mode="json", exclude={"idempotency_key"}))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class Outbox:
    """The three atomic steps of a submit, and cancellation of tasks nobody holds."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._confirm = client.register_script(_CONFIRM)
        self._cancel = client.register_script(_CANCEL)

    def claim(self, entries: list[tuple[str, AgentTask, dict[str, Any], str]],
              now: float) -> list[Claim]:
        """Bind keys and record tasks as `submitting`, atomically. Entries are
        (task id, task, message body, queue). Raises IdempotencyConflict."""
        args: list[Any] = [now, self.ttl_s, keys.task(""), keys.tenant_index(""),
                           keys.tenant_open("")]
        for task_id, task, body, queue in entries:
            idem = keys.idempotency(task.idempotency_key) if task.idempotency_key else ""
            args += [task_id, idem, fingerprint(task),
                     json.dumps(body, separators=(",", ":")), queue,
                     task.labels.get(TENANT_LABEL, ""),
                     json.dumps(task.labels, separators=(",", ":"), sort_keys=True)]
        out = self._claim(keys=[keys.TASK_INDEX], args=args)
        claims = [_claim(v) for v in out]
        conflicts = {task.idempotency_key or "": c.task_id
                     for (_, task, _, _), c in zip(entries, claims, strict=True)
                     if c.verdict == "conflict"}
        if conflicts:
            raise IdempotencyConflict(conflicts)
        return claims

    def open_count(self, tenant: str, at_least: int) -> int:
        """How many of a tenant's tasks have not finished. Exact up to `at_least`: entries
        whose task ended without being removed (its worker died, its record expired) are
        pruned only when the count reaches that, so the common check is one ZCARD."""
        key = keys.tenant_open(tenant)
        count = int(self.r.zcard(key))
        if count < at_least:
            return count
        ids = [as_text(t) for t in self.r.zrange(key, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(keys.task(task_id), "status")
        ended = [t for t, status in zip(ids, pipe.execute(), strict=True)
                 if status is None or as_text(status) in _FINAL]
        if ended:
            self.r.zrem(key, *ended)
        return len(ids) - len(ended)

    def confirm(self, task_ids: list[str], pipe: Any) -> None:
        """Into `pipe`: published tasks become `queued` (unless a worker began them)."""
        if task_ids:
            self._confirm(keys=[], args=[keys.task(""), *task_ids], client=pipe)

    def cancel(self, task_ids: list[str], now: float) -> dict[str, tuple[str, str | None]]:
        """Task id -> (outcome, final status if it had already ended)."""
        out = self._cancel(keys=[keys.RUNNING, keys.CANCELLED],
                           args=[now, self.ttl_s, keys.task(""), ",".join(_FINAL),
                                 keys.tenant_open(""), *task_ids])
        return {t: (as_text(v[0]), as_text(v[1]) if len(v) > 1 else None)
                for t, v in zip(task_ids, out, strict=True)}


def _claim(value: list[Any]) -> Claim:
    verdict, task_id = as_text(value[0]), as_text(value[1])
    if verdict == "republish":
        return Claim(verdict, task_id, json.loads(as_text(value[2])), as_text(value[3]) or None)
    return Claim(verdict, task_id)
