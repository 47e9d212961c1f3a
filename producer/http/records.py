"""Reading tasks for the HTTP API: records with their owner, stored results, the tenant index.

All of it reads the records the CLI and Python client write (`sq:task:<id>`, Celery's result
key, `sq:idx:tenant:<tenant>`); nothing here has state of its own.
"""

from __future__ import annotations

import base64
import heapq
import itertools
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
         keep: Any, scan_max: int = 5000, chunk_size: int = 500,
         ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
    """Newest first: up to `limit` (task id, record) pairs of the tenant's index that `keep`
    accepts, and the cursor after the last one looked at. Entries at one submit time come
    in a fixed order (Redis orders ties by member), so the cursor is (score, how many at
    that score were passed). At most `scan_max` entries are examined per call: a filter
    that matches little returns a short page with a cursor rather than scanning forever.
    Records are read `chunk_size` at a time (the dashboard reads about two pages' worth)."""
    top, skip = decode_cursor(cursor) if cursor else (float("inf"), 0)
    found: list[tuple[str, dict[str, str]]] = []
    examined = 0
    while examined < scan_max:
        chunk = r.zrevrangebyscore(keys.tenant_index(tenant), _bound(top), "-inf", start=skip,
                                   num=min(chunk_size, scan_max - examined), withscores=True)
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


def page_across(r: redis.Redis, tenants: list[str], *, limit: int, cursor: str | None,
                keep: Any, chunk_size: int = 500,
                ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
    """`page` over several tenants' indexes at once, newest first (an admin's view of every
    tenant). The cursor holds one `page` cursor per tenant (None: that index is done); a
    tenant whose page was only partly shown is read again up to the last row shown, so its
    cursor is exactly `page`'s. Tenants are read newest head first, and one whose newest
    entry is older than the page's last row so far is not read at all: with many tenants,
    only those with something to show cost more than one pipelined read."""
    state = _decode_multi(cursor) if cursor else dict.fromkeys(tenants, "")
    pages: dict[str, list[tuple[str, dict[str, str]]]] = {}
    after: dict[str, str | None] = {}
    best: list[float] = []  # the `limit` newest submit times seen so far, a min-heap
    heads = _heads(r, state)  # tenants with nothing after their cursor are done
    for head, tenant in heads:
        if len(best) == limit and head < best[0]:
            break  # this tenant and every later one hold only older tasks
        pages[tenant], after[tenant] = page(r, tenant, limit=limit, cursor=state[tenant] or None,
                                            keep=keep, chunk_size=chunk_size)
        for _, rec in pages[tenant]:
            heapq.heappush(best, float(rec.get("submitted_at") or 0))
            if len(best) > limit:
                heapq.heappop(best)
    # A merge takes from the head of each tenant's page, so what is shown of a tenant is
    # always a prefix of its page (what the re-read below relies on).
    merged = heapq.merge(*([(tenant, i, rec) for i, (_, rec) in enumerate(rows)]
                           for tenant, rows in sorted(pages.items())),
                         key=lambda x: -float(x[2].get("submitted_at") or 0))
    ranked = list(itertools.islice(merged, limit))
    shown = dict.fromkeys(pages, 0)
    for tenant, _, _ in ranked:
        shown[tenant] += 1
    for tenant, n in shown.items():
        if 0 < n < len(pages[tenant]):  # partly shown: its cursor stops after the last shown
            _, after[tenant] = page(r, tenant, limit=n, cursor=state[tenant] or None,
                                    keep=keep, chunk_size=chunk_size)
        elif n == 0 and pages[tenant]:
            after[tenant] = state[tenant]
    found = [pages[tenant][i] for tenant, i, _ in ranked]
    for _, tenant in heads:
        if tenant not in pages:
            after[tenant] = state[tenant]  # not read (nothing new enough): stays put
    rest = {t: after.get(t) for t in state if after.get(t) is not None}
    return found, (_encode_multi(rest) if rest else None)


def _heads(r: redis.Redis, state: dict[str, str | None]) -> list[tuple[float, str]]:
    """(newest entry's score after its cursor, tenant), newest first; done tenants left out."""
    live = [(t, decode_cursor(at) if at else (float("inf"), 0)) for t, at in state.items()
            if at is not None]
    pipe = r.pipeline(transaction=False)
    for tenant, (top, skip) in live:
        pipe.zrevrangebyscore(keys.tenant_index(tenant), _bound(top), "-inf", start=skip,
                              num=1, withscores=True)
    heads = [(entry[0][1], tenant) for (tenant, _), entry in zip(live, pipe.execute(),
                                                                 strict=True) if entry]
    return sorted(heads, key=lambda h: (-h[0], h[1]))


def _encode_multi(cursors: dict[str, str | None]) -> str:
    raw = json.dumps(cursors, separators=(",", ":")).encode()
    return "m" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_multi(cursor: str) -> dict[str, str | None]:
    try:
        if not cursor.startswith("m"):
            raise ValueError("not a multi-tenant cursor")
        text = base64.urlsafe_b64decode(cursor[1:] + "=" * (-len(cursor[1:]) % 4)).decode()
        value = json.loads(text)
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str | None) for k, v in value.items()):
            raise ValueError("not a map of cursors")
        return value
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, "bad_request", "cursor is not one this server gave out; start "
                      "again without ?cursor=") from e
