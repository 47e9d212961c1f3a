"""The dashboard's batch pages: the list of batches, one batch's progress, cancel, retry.

A batch's progress is `Batch.counts()` (what `GET /v1/batches/{id}` answers) plus what the
finished tasks' results say: failures by error category and the p50/p95 duration. Results
are read once per finished task and kept by the page's live stream, so following a batch
costs one status read per unfinished task per second.

"Retry failed" runs the failed, timed-out and cancelled inputs again the way the CLI's
`sandqueue batch --retry-failed` does (`Batch.next_generation`, then `Batch.submit` under a
new idempotency key), from the prepared tasks an HTTP batch keeps (`sq:batch:<id>:tasks`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from producer.api import Client
from producer.batch import Batch, BatchInput, batch_key
from producer.http import sse
from producer.http.batches import owned_batch
from producer.http.dashboard.pages import SSE_HEADERS, Who
from producer.http.dashboard.render import duration, page
from producer.http.dashboard.session import Viewer, check_form, session_valid
from producer.http.problems import not_found
from producer.http.tasks import charge
from sandqueue import keys
from sandqueue.contract import FINAL_STATUSES, AgentTask, TaskStatus
from sandqueue.store import as_text

router = APIRouter(include_in_schema=False)
LIST_ROWS = 50
LIST_SCAN_MAX = 2000
LIVE_POLL_S = 1.0
FINAL = {s.value for s in FINAL_STATUSES}
RETRYABLE = {TaskStatus.FAILED.value, TaskStatus.TIMED_OUT.value, TaskStatus.CANCELLED.value}


@dataclass
class Finished:
    """What the results of a batch's finished tasks said (error category, total seconds),
    read once per task; figures cover the tasks answering for the inputs now (a retried
    input's earlier task no longer counts)."""

    known: dict[str, tuple[str | None, float | None]] = field(default_factory=dict)
    by_error: dict[str, int] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)

    def read(self, batch: Batch, final_ids: list[str]) -> None:
        new = [t for t in final_ids if t not in self.known]
        for task_id, result in batch.results(new).items():
            self.known[task_id] = (result.error.category.value if result.error else None,
                                   result.timings.total_s)
        self.by_error, self.durations = {}, []
        for task_id in final_ids:
            category, took = self.known.get(task_id, (None, None))
            if category is not None:
                self.by_error[category] = self.by_error.get(category, 0) + 1
            if took is not None:
                self.durations.append(took)


HISTOGRAM_BINS = 10


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> list[tuple[str, int]]:
    """Durations in `bins` equal-width bins from 0 to the longest: (upper bound, count)."""
    if not values:
        return []
    top = max(values) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int(bins * value / top))] += 1
    return [(duration(top * (i + 1) / bins), n) for i, n in enumerate(counts)]


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def summary(batch: Batch, finished: Finished, now: float | None = None) -> dict[str, Any]:
    """Counts, cost, budget, rate, ETA, failures by category and duration percentiles."""
    ids = list(batch.items().values())
    states = batch.states(ids)
    finished.read(batch, [t for t, (s, _) in states.items() if s in FINAL])
    counts: dict[str, int] = {}
    for status, _ in states.values():
        counts[status] = counts.get(status, 0) + 1
    meta = batch.meta()
    total = int(meta.get("total") or len(ids))
    done = counts.get("succeeded", 0)
    failed = sum(counts.get(s, 0) for s in RETRYABLE)
    running = counts.get("running", 0) + counts.get("retrying", 0)
    queued = total - done - failed - running
    remaining = total - done - failed
    kept = bool(batch.r.exists(batch_key(batch.id, "tasks")))
    status = meta.get("status", "?")
    if status == "running" and remaining <= 0:
        status = "done"  # an HTTP batch has no follower process to mark it so
    elapsed = max(1e-6, (now or time.time()) - float(meta.get("created_at") or time.time()))
    rate = (done + failed) / elapsed
    return {
        "batch_id": batch.id, "status": status, "reason": meta.get("reason"),
        "tenant": meta.get("tenant") or None, "source": meta.get("source"),
        "created_at": meta.get("created_at"), "total": total, "done": done, "failed": failed,
        "running": running, "queued": queued, "by_status": counts,
        "cost_usd": round(sum(c for _, c in states.values()), 6),
        "budget_usd": float(meta["max_cost_usd"]) if meta.get("max_cost_usd") else None,
        "rate_per_min": round(rate * 60, 2),
        "eta_s": round(remaining / rate, 1) if rate > 0 and remaining > 0 else None,
        "by_error": dict(sorted(finished.by_error.items(), key=lambda x: -x[1])),
        "p50_s": _pct(finished.durations, 0.5), "p95_s": _pct(finished.durations, 0.95),
        "histogram": histogram(finished.durations),
        "kept": kept, "retryable": bool(failed) and kept, "ended": remaining <= 0,
    }


@router.get("/batches")
def batches_page(request: Request, who: Who, cursor: str = "") -> HTMLResponse:
    """Newest first, the batches this viewer may see, a page at a time."""
    client: Client = request.app.state.client
    top = float(cursor) if _is_number(cursor) else float("inf")
    rows: list[dict[str, Any]] = []
    scanned = 0
    after: str | None = None
    while len(rows) < LIST_ROWS and scanned < LIST_SCAN_MAX:
        chunk = client.redis.zrevrangebyscore(keys.BATCHES, f"({top!r}" if top != float("inf")
                                              else "+inf", "-inf", start=0, num=100,
                                              withscores=True)
        if not chunk:
            after = None
            break
        pipe = client.redis.pipeline(transaction=False)
        for member, _ in chunk:
            pipe.hgetall(batch_key(as_text(member)))
        for (member, score), raw in zip(chunk, pipe.execute(), strict=True):
            scanned += 1
            top = score
            meta = {as_text(k): as_text(v) for k, v in raw.items()}
            if meta and who.caller.owns(meta.get("tenant") or None):
                rows.append({"id": as_text(member), **meta})
                if len(rows) == LIST_ROWS:
                    break
        after = repr(top)
    return page(request, "batches.html", who=who, nav="batches", rows=rows,
                after=after if rows or scanned else None, cursor=cursor)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return bool(text)


def _owned(request: Request, who: Viewer, batch_id: str) -> Batch:
    batch = owned_batch(request, who.caller, batch_id)
    if not batch.exists():
        raise not_found(f"batch {batch_id[:64]}")
    return batch


@router.get("/batches/{batch_id}")
def batch_page(request: Request, batch_id: str, who: Who) -> HTMLResponse:
    batch = _owned(request, who, batch_id)
    return page(request, "batch.html", who=who, nav="batches",
                b=summary(batch, Finished()))


@router.get("/batches/{batch_id}/live")
async def batch_live(request: Request, batch_id: str, who: Who) -> StreamingResponse:
    batch = await run_in_threadpool(_owned, request, who, batch_id)
    slots = sse.StreamSlots(request.app.state)
    slots.check()
    frames = _frames(batch, request.app.state.settings.api_heartbeat_s)
    return StreamingResponse(slots.hold(frames, session_valid(request)),
                             media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _frames(batch: Batch, heartbeat_s: float) -> AsyncIterator[bytes]:
    finished = Finished()
    last: list[dict[str, Any] | None] = [None]

    async def step() -> tuple[bytes | None, bool]:
        now = await run_in_threadpool(summary, batch, finished)
        steady = {k: v for k, v in now.items() if k not in ("rate_per_min", "eta_s")}
        if steady == last[0]:
            return None, False
        last[0] = steady
        return f"data: {json.dumps(now)}\n\n".encode(), False

    yield b"retry: 2000\n\n"
    async for chunk in sse.polled(step, heartbeat_s, LIVE_POLL_S):
        yield chunk


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(request: Request, batch_id: str, who: Who,
                 csrf: Annotated[str, Form()] = "") -> Response:
    check_form(request, who, csrf, "cancel")
    _owned(request, who, batch_id).cancel()
    return RedirectResponse(f"/batches/{batch_id}", status_code=303)


@router.post("/batches/{batch_id}/retry")
def retry_failed(request: Request, batch_id: str, who: Who,
                 csrf: Annotated[str, Form()] = "") -> Response:
    check_form(request, who, csrf, "submit")
    batch = _owned(request, who, batch_id)
    inputs = failed_inputs(batch)
    if inputs:
        charge(request, who.caller, 1)  # one request, one charge, as a batch submit
        for item in inputs:
            batch.next_generation(item.key)
        batch.r.hset(batch_key(batch.id), mapping={"status": "running", "reason": ""})
        batch.submit(inputs)
        batch.seal()  # as POST /v1/batches does: the new round can end (and its webhook go)
    return RedirectResponse(f"/batches/{batch_id}", status_code=303)


def failed_inputs(batch: Batch) -> list[BatchInput]:
    """The inputs whose task ended failed, timed out or cancelled, with their kept tasks."""
    items = batch.items()
    states = batch.states(list(items.values()))
    failed = [k for k, t in items.items() if states[t][0] in RETRYABLE]
    if not failed:
        return []
    kept = batch.r.hmget(batch_key(batch.id, "tasks"), failed)
    lines = batch.r.hmget(batch_key(batch.id, "lines"), failed)
    return [BatchInput(key, int(line or 0), AgentTask.model_validate_json(raw))
            for key, raw, line in zip(failed, kept, lines, strict=True) if raw is not None]
