"""Optional signing of task messages: write access to Redis alone cannot make workers run a
task.

With `SANDQUEUE_SIGNING_KEYS` set on producers and workers, a producer adds `sig`, an
HMAC-SHA256 over the task id and the message body, and a worker refuses (as `invalid_task`,
never run) a message whose `sig` is missing or wrong. Keys rotate like sealing keys: the
first signs, any verifies.

What it does not do: someone who can write to Redis can still delete or reorder queued
messages, read results, or replay a signed message (a replay is the same task id, which
the worker's de-duplication drops once it ran). Task contents are not hidden by signing
(inline secrets are sealed separately). The cost is one HMAC per message on each side.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SIG_FIELD = "sig"


def _keys(keys: str | None) -> list[bytes]:
    return [k.strip().encode() for k in (keys or "").split(",") if k.strip()]


def _mac(key: bytes, task_id: str, body: dict[str, Any]) -> str:
    unsigned = {k: v for k, v in body.items() if k != SIG_FIELD}
    canonical = json.dumps([task_id, unsigned], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def sign(keys: str | None, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body with its signature (unchanged when no keys are set)."""
    usable = _keys(keys)
    if not usable:
        return body
    return {**body, SIG_FIELD: _mac(usable[0], task_id, body)}


def verify(keys: str | None, task_id: str, body: Any) -> str | None:
    """None when the message may run, else why it may not."""
    usable = _keys(keys)
    if not usable:
        return None
    sig = body.get(SIG_FIELD) if isinstance(body, dict) else None
    if not isinstance(sig, str):
        return ("unsigned message refused: workers have SANDQUEUE_SIGNING_KEYS, so every "
                "producer must sign with one of them")
    if not any(hmac.compare_digest(sig, _mac(k, task_id, body)) for k in usable):
        return ("message signature does not match this worker's SANDQUEUE_SIGNING_KEYS "
                "(forged, altered, or signed with a key workers do not have)")
    return None
