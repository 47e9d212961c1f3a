"""Reading tasks for the HTTP API: records with their owner, stored results, the tenant index.

All of it reads the records the CLI and Python client write (`sq:task:<id>`, Celery's result
key, `sq:idx:tenant:<tenant>`, `sq:idx:all`); nothing here has state of its own.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from producer.api import Client
from producer.http.auth import Caller
from producer.http.problems import Problem, not_found
from sandqueue import keys
from sandqueue.contract import AgentResult
from sandqueue.store import as_text

_TASK_ID_MAX = 200


def result_key(client: Client, task_id: str) -> str:
    key = client.celery.backend.get_key_for_task(task_id)
    return as_text(key)


def decode_result(raw: bytes | str | None) -> dict[str, Any] | None:
    """The AgentResult (as JSON data) in a Celery result value, or None."""
    if raw is None:
        return None
    value = json.loads(raw).get("result")
    if not isinstance(value, dict):
        return None
    return AgentResult.model_validate(value).model_dump(mode="json")


def owned_record(client: Client, caller: Caller, task_id: str) -> dict[str, str]:
    """The task's record, or 404 when there is none or it is not the caller's."""
    if not task_id or len(task_id) > _TASK_ID_MAX:
        raise not_found(f"task {task_id[:_TASK_ID_MAX]!r}")
    record = client.store.get(task_id)
    if not record or not caller.owns(record.get("tenant")):
        raise not_found(f"task {task_id}")
    return record


def read_result(client: Client, task_id: str) -> dict[str, Any] | None:
    return decode_result(client.redis.get(result_key(client, task_id)))


# -- listing ---------------------------------------------------------------------------------

def encode_cursor(score: float, skip: int) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{skip}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, skip = text.split(":")
        return float(score), int(skip)
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, "bad_request", "cursor is not one this API gave out; start "
                      "again without ?cursor=") from e


def page(r: redis.Redis, tenant: str, *, limit: int, cursor: str | None,
         keep: Any, scan_max: int = 5000, chunk_size: int = 500, index: str | None = None,
         ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
    """Newest first: up to `limit` (task id, record) pairs of the tenant's index (or of
    `index`: the all-tenants one) that `keep` accepts, and the cursor after the last one
    looked at. Entries at one submit time come
    in a fixed order (Redis orders ties by member), so the cursor is (score, how many at
    that score were passed). At most `scan_max` entries are examined per call: a filter
    that matches little returns a short page with a cursor rather than scanning forever.
    Records are read `chunk_size` at a time (the dashboard reads about two pages' worth)."""
    top, skip = decode_cursor(cursor) if cursor else (float("inf"), 0)
    found: list[tuple[str, dict[str, str]]] = []
    examined = 0
    while examined < scan_max:
        chunk = r.zrevrangebyscore(index or keys.tenant_index(tenant), _bound(top), "-inf",
                                   start=skip, num=min(chunk_size, scan_max - examined),
                                   withscores=True)
        if not chunk:
            return found, None
        pipe = r.pipeline(transaction=False)
        for member, _ in chunk:
            pipe.hgetall(keys.task(as_text(member)))
        for (member, score), raw in zip(chunk, pipe.execute(), strict=True):
            examined += 1
            skip = skip + 1 if score == top else 1
            top = score
            record = {as_text(k): as_text(v) for k, v in raw.items()}
            if record and keep(record):
                found.append((as_text(member), record))
                if len(found) == limit:
                    return found, encode_cursor(top, skip)
    return found, encode_cursor(top, skip)


def _bound(score: float) -> str:
    return "+inf" if score == float("inf") else repr(score)
