"""API keys for the HTTP API: who may do what, for which tenant.

A key is `sqk_<id>_<secret>` (the secret: 32 random bytes). It is printed once, when it is
made; Redis keeps only its sha256 (`sq:apikey:<id>`) with the tenant, scopes, the `${NAME}`
environment references its tasks may use, its submit rate limit, and created / last-used /
expiry / revoked. A 256-bit random secret needs no slow hash: nobody can guess it, and a
leaked Redis dump gives no key that works.

Checking a key looks its record up by id and compares hashes with `hmac.compare_digest`, so
the time taken says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from sandqueue import errors, keys
from sandqueue.contract import ENV_NAME
from sandqueue.sealing import Sealer
from sandqueue.store import as_text

SCOPES = ("submit", "read", "cancel", "admin")
"""`submit` tasks and batches; `read` status, results, events, listings; `cancel` them;
`admin` all of that for every tenant's tasks, not only the key's own."""
DEFAULT_SCOPES = ("submit", "read", "cancel")
KEY_PREFIX = "sqk_"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_KEY = re.compile(r"^sqk_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})\Z")
_TOUCH_EVERY_S = 10.0
"""`last_used_at` is written at most this often per key, not on every request."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    scopes: frozenset[str]
    allow_env: frozenset[str]
    created_at: float
    last_used_at: float | None = None
    expires_at: float | None = None
    revoked: bool = False
    submit_rate_per_min: int | None = None
    """Submits per minute for this key's tenant; None = the deployment's default."""
    max_queued: int | None = None
    """Unfinished tasks this key's tenant may have at once; None = no limit."""
    webhook_secret: str | None = field(default=None, repr=False)
    """The key's callback signing secret, sealed (`sandqueue.sealing`); None when the
    deployment had no SANDQUEUE_SECRET_KEYS to seal it with."""

    def refusal(self, now: float) -> str | None:
        """Why this key may not be used now, or None."""
        if self.revoked:
            return "this API key was revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "this API key has expired; create a new one with `sandqueue apikey create`"
        return None

    def allows(self, scope: str) -> bool:
        """Does this key hold `scope`? `admin` holds every scope."""
        return scope in self.scopes or "admin" in self.scopes

    def public(self) -> dict[str, Any]:
        """What `apikey list` shows: everything but the hash."""
        return {"id": self.id, "tenant": self.tenant, "scopes": sorted(self.scopes),
                "allow_env": sorted(self.allow_env), "created_at": self.created_at,
                "last_used_at": self.last_used_at, "expires_at": self.expires_at,
                "revoked": self.revoked, "submit_rate_per_min": self.submit_rate_per_min,
                "max_queued": self.max_queued,
                "webhooks": self.webhook_secret is not None}


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        raise errors.ConfigError(f"unknown scope(s) {unknown or text!r}; choose from "
                                 f"{', '.join(SCOPES)}")
    return scopes


def parse_env_names(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    bad = sorted(n for n in names if not ENV_NAME.match(n))
    if bad:
        raise errors.ConfigError(f"not environment variable names: {bad}")
    return names


class ApiKeys:
    """API key records in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def create(self, tenant: str, *, scopes: frozenset[str] = frozenset(DEFAULT_SCOPES),
               expires_days: float | None = None, allow_env: frozenset[str] = frozenset(),
               submit_rate_per_min: int | None = None, sealer: Sealer | None = None,
               max_queued: int | None = None) -> tuple[ApiKey, str, str | None]:
        """Make a key; returns its record, the key itself (shown once, only its hash is
        stored) and, when `sealer` can seal it, its webhook signing secret (shown once,
        stored sealed: workers open it to sign callbacks)."""
        if expires_days is not None and not (0 < expires_days <= 36500):  # nan fails too
            raise errors.ConfigError(f"expires: {expires_days} days; give a number of days "
                                     "above 0, at most 36500")
        if not TENANT_NAME.match(tenant):
            raise errors.ConfigError(f"tenant {tenant!r}: use 1-64 letters, digits, '_', '.', "
                                     "'-', starting with a letter or digit")
        now = time.time()
        key_id = secrets.token_hex(8)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        webhook = f"whsec_{secrets.token_urlsafe(32)}" if sealer and sealer.enabled else None
        record = ApiKey(key_id, tenant, scopes, allow_env, now,
                        expires_at=now + expires_days * 86400 if expires_days else None,
                        submit_rate_per_min=submit_rate_per_min, max_queued=max_queued,
                        webhook_secret=sealer.seal(webhook) if sealer and webhook else None)
        fields: dict[str, Any] = {
            "hash": _hash(secret), "tenant": tenant, "scopes": ",".join(sorted(scopes)),
            "allow_env": ",".join(sorted(allow_env)), "created_at": now,
        }
        if record.expires_at is not None:
            fields["expires_at"] = record.expires_at
        if submit_rate_per_min is not None:
            fields["submit_rate_per_min"] = submit_rate_per_min
        if max_queued is not None:
            fields["max_queued"] = max_queued
        if record.webhook_secret is not None:
            fields["webhook_secret"] = record.webhook_secret
        pipe = self.r.pipeline()
        pipe.hset(keys.apikey(key_id), mapping=fields)
        pipe.sadd(keys.APIKEYS, key_id)
        pipe.execute()
        return record, secret, webhook

    def get(self, key_id: str) -> ApiKey | None:
        raw = {as_text(k): as_text(v) for k, v in self.r.hgetall(keys.apikey(key_id)).items()}
        return _record(key_id, raw) if raw else None

    def authenticate(self, presented: str) -> tuple[ApiKey | None, str]:
        """(key, "") for a usable key, else (None, why it was refused)."""
        match = _KEY.match(presented)
        key_id = match.group(1) if match else "0" * 16
        raw = {as_text(k): as_text(v) for k, v in self.r.hgetall(keys.apikey(key_id)).items()}
        # Compared even when there is no record, so both cases take the same time.
        stored = raw.get("hash", "0" * 64)
        if not hmac.compare_digest(stored.encode(), _hash(presented).encode()) or not raw:
            return None, "unknown API key"
        record = _record(key_id, raw)
        now = time.time()
        why = record.refusal(now)
        if why:
            return None, why
        if record.last_used_at is None or now - record.last_used_at > _TOUCH_EVERY_S:
            self.r.hset(keys.apikey(key_id), "last_used_at", now)
        return record, ""

    def list(self) -> list[ApiKey]:
        ids = sorted(as_text(i) for i in self.r.smembers(keys.APIKEYS))
        found = [self.get(i) for i in ids]
        return sorted((k for k in found if k is not None), key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> bool:
        """True if the key existed (revoked now or before)."""
        if not self.r.exists(keys.apikey(key_id)):
            return False
        self.r.hset(keys.apikey(key_id), "revoked", 1)
        return True

    def charge_submits(self, tenant: str, count: int, per_min: int) -> float | None:
        """Count `count` submits against the tenant's per-minute limit; None when they fit,
        else the seconds until the window resets (for Retry-After). A refused charge is
        given back, so a burst of refusals does not lock the tenant out for longer."""
        now = time.time()
        window = int(now // 60)
        key = keys.submit_rate(tenant, window)
        pipe = self.r.pipeline()
        pipe.incrby(key, count)
        pipe.expire(key, 120)
        used = int(pipe.execute()[0])
        if used <= per_min:
            return None
        self.r.decrby(key, count)
        return max(1.0, (window + 1) * 60 - now)


def _record(key_id: str, raw: dict[str, str]) -> ApiKey:
    def number(name: str) -> float | None:
        return float(raw[name]) if raw.get(name) else None

    rate = raw.get("submit_rate_per_min")
    queued = raw.get("max_queued")
    return ApiKey(
        id=key_id, tenant=raw.get("tenant", ""),
        scopes=frozenset(s for s in raw.get("scopes", "").split(",") if s),
        allow_env=frozenset(s for s in raw.get("allow_env", "").split(",") if s),
        created_at=float(raw.get("created_at") or 0), last_used_at=number("last_used_at"),
        expires_at=number("expires_at"), revoked=raw.get("revoked") == "1",
        submit_rate_per_min=int(rate) if rate else None,
        max_queued=int(queued) if queued else None,
        webhook_secret=raw.get("webhook_secret") or None,
    )
