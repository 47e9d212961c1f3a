"""Fleet-wide limits, kept in Redis so every worker on every machine shares them.

E2B plans cap sandboxes alive at once (Hobby 20, Pro 100) and creations per second (1 and
5). Slots are leases: members of a sorted set scored by expiry, renewed by the holder's
maintenance thread, so a crashed worker's slots free themselves. One Lua script takes all a
task needs at once (or nothing), so two limits cannot deadlock each other.

- `sq:limit:sandboxes`: sandboxes alive, fleet-wide (`SANDQUEUE_MAX_LIVE_SANDBOXES`).
- `sq:limit:rate`: a token bucket for creations (`SANDQUEUE_MAX_CREATES_PER_S`). When E2B
  or the model answers 429 anyway, the bucket cools down for Retry-After (or a few
  seconds) and runs at half rate for a minute, then recovers by itself.
- `sq:limit:key:<kind>:<value>`: running tasks per key (`SANDQUEUE_KEY_LIMITS`, e.g.
  `label.tenant=5,credential=2`). A task over its key's limit does not hold a worker thread:
  it waits briefly for a slot, then goes to the back of the queue, so one tenant's backlog
  cannot starve another's (tasks of other keys are taken in between).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import redis

from sandqueue import errors, keys
from sandqueue.contract import AgentTask
from sandqueue.settings import Settings

SANDBOXES = keys.LIMIT_SANDBOXES
RATE = keys.LIMIT_RATE
COOLDOWN = keys.LIMIT_COOLDOWN
SLOWDOWN = keys.LIMIT_SLOWDOWN
WAKE = keys.LIMIT_WAKE

# KEYS: n slot sets..., then rate, cooldown, slowdown. ARGV: holder, now, expiry, n,
# limits (n of them), rate per s (0 = none), burst.
# Returns 0 when everything was taken, else milliseconds worth waiting before trying again.
_ACQUIRE = """
local n = tonumber(ARGV[4])
local now = tonumber(ARGV[2])
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local held = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if not held and redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[4 + i]) then
    return 1000
  end
end
local rate = tonumber(ARGV[5 + n])
if rate > 0 then
  local cool = redis.call('PTTL', KEYS[n + 2])
  if cool > 0 then return cool end
  if redis.call('EXISTS', KEYS[n + 3]) == 1 then rate = rate / 2 end
  local burst = tonumber(ARGV[6 + n])
  local b = redis.call('HMGET', KEYS[n + 1], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + (now - ts) * rate)
  if tokens < 1 then
    return math.ceil((1 - tokens) / rate * 1000)
  end
  redis.call('HSET', KEYS[n + 1], 'tokens', tokens - 1, 'ts', now)
  redis.call('EXPIRE', KEYS[n + 1], 3600)
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], ARGV[3], ARGV[1])
  redis.call('EXPIRE', KEYS[i], 86400)
end
return 0
"""


@dataclass(frozen=True)
class Slot:
    key: str
    limit: int


def parse_key_limits(spec: str | None) -> dict[str, int]:
    """`label.tenant=5,credential=2,anthropic_key=50` -> {"label.tenant": 5, ...}"""
    limits: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise errors.ConfigError(
                f"SANDQUEUE_KEY_LIMITS item {item!r}: write KIND=N with N >= 1, e.g. "
                "label.tenant=5, credential=2 or anthropic_key=50"
            )
        if not (name.startswith("label.") or name in {"credential", "anthropic_key"}):
            raise errors.ConfigError(
                f"SANDQUEUE_KEY_LIMITS: unknown kind {name!r}; use label.<name>, credential "
                "or anthropic_key"
            )
        limits[name] = int(value)
    return limits


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:20]


class Limiter:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.key_limits = parse_key_limits(settings.key_limits)
        self._script = client.register_script(_ACQUIRE)
        self._held: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    # -- which slots a task needs ------------------------------------------------------
    def task_slots(self, task: AgentTask, secrets: list[str]) -> list[Slot]:
        """Per-key slots held while the task runs (never its secrets in clear: digests)."""
        slots: list[Slot] = []
        for kind, limit in self.key_limits.items():
            if kind.startswith("label."):
                label = kind.removeprefix("label.")
                if label in task.labels:
                    slots.append(Slot(keys.limit_key(kind, task.labels[label]), limit))
            elif kind == "credential":
                slots += [Slot(keys.limit_key("cred", _digest(s)), limit) for s in set(secrets)]
            elif kind == "anthropic_key" and self.settings.anthropic_api_key is not None:
                key = self.settings.anthropic_api_key.get_secret_value()
                slots.append(Slot(keys.limit_key("anthropic", _digest(key)), limit))
        return slots

    def sandbox_slots(self) -> list[Slot]:
        limit = self.settings.live_sandbox_limit
        return [Slot(SANDBOXES, limit)] if limit else []

    # -- taking and giving back --------------------------------------------------------
    def try_acquire(self, holder: str, slots: list[Slot], *, rate: bool) -> float:
        """0 when all slots (and a creation token, if `rate`) were taken; else seconds to wait."""
        per_s = self.settings.create_rate_limit if rate else 0
        if not slots and not per_s:
            return 0.0
        now = time.time()
        wait_ms = self._script(
            keys=[s.key for s in slots] + [RATE, COOLDOWN, SLOWDOWN],
            args=[holder, now, now + self.settings.lease_ttl_s, len(slots),
                  *[s.limit for s in slots], per_s or 0, max(1.0, per_s or 0)],
        )
        if int(wait_ms) == 0:
            with self._lock:
                self._held.setdefault(holder, []).extend(s.key for s in slots)
            return 0.0
        return int(wait_ms) / 1000

    def acquire(self, holder: str, slots: list[Slot], *, rate: bool, until: float,
                interrupted: threading.Event | None = None) -> None:
        """Wait for slots without spinning (woken when slots free up), up to `until`."""
        while True:
            wait_s = self.try_acquire(holder, slots, rate=rate)
            if wait_s == 0:
                return
            left = until - time.time()
            if left <= 0:
                raise errors.DeadlineExceeded(
                    "the task's deadline passed while waiting for a sandbox slot "
                    "(SANDQUEUE_MAX_LIVE_SANDBOXES / SANDQUEUE_MAX_CREATES_PER_S)"
                )
            if interrupted is not None and interrupted.is_set():
                return
            self.r.blpop([WAKE], timeout=max(0.05, min(wait_s, left, 2.0)))

    def release(self, holder: str) -> None:
        with self._lock:
            held = self._held.pop(holder, [])
        if not held:
            return
        pipe = self.r.pipeline(transaction=False)
        for key in held:
            pipe.zrem(key, holder)
        pipe.lpush(WAKE, "1")
        pipe.ltrim(WAKE, 0, 200)
        pipe.execute()

    def renew(self) -> None:
        """Extend every slot this process holds (called by the maintenance thread)."""
        with self._lock:
            held = {h: list(k) for h, k in self._held.items()}
        if not held:
            return
        expiry = time.time() + self.settings.lease_ttl_s
        pipe = self.r.pipeline(transaction=False)
        for holder, slot_keys in held.items():
            for key in slot_keys:
                pipe.zadd(key, {holder: expiry}, xx=True)
        pipe.execute()

    def slow_down(self, retry_after_s: float | None) -> None:
        """E2B or the model said 429: pause creations, then run at half rate for a while."""
        pause_ms = int(max(1.0, retry_after_s or 5.0) * 1000)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(COOLDOWN, "1", px=pause_ms)
        pipe.set(SLOWDOWN, "1", ex=60)
        pipe.execute()
