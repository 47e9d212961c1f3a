"""The dashboard's fleet page: workers and their leases, live sandboxes against the cap,
creation rate against its limit and any 429 cool-down, queue depths, per-tenant load.

All of it is `sandqueue.fleet.fleet_snapshot` (a few pipelined reads, never a keyspace
walk), rendered once and then re-sent over SSE every `LIVE_POLL_S`. A tenant key sees the
fleet-wide figures and its own tenant's row; an admin key every tenant's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse

from producer.http import sse
from producer.http.dashboard.pages import SSE_HEADERS, Who
from producer.http.dashboard.render import duration, page
from producer.http.dashboard.session import Viewer, session_valid
from sandqueue.fleet import FleetSnapshot, fleet_snapshot

router = APIRouter(include_in_schema=False)
LIVE_POLL_S = 2.0


def snapshot(request: Request, who: Viewer) -> FleetSnapshot:
    snap = fleet_snapshot(request.app.state.client.redis,
                          queues=[request.app.state.settings.queue])
    if not who.admin:
        snap.tenants = [t for t in snap.tenants if t.tenant == who.tenant]
    return snap


def figures(snap: FleetSnapshot) -> dict[str, Any]:
    """The page's numbers and table rows, as text: what the live stream sends."""
    s, c = snap.sandboxes, snap.creations
    return {
        "figures": {
            "f-workers": len(snap.workers), "f-running": snap.running,
            "f-sandboxes": s.live, "f-cap": s.cap if s.cap is not None else "none",
            "f-counted": s.counted_by,
            "f-rate": f"{c.per_s:.2f}/s",
            "f-rate-limit": f"{c.limit_per_s:g}/s" if c.limit_per_s is not None else "none",
            "f-429": c.rate_limited_last_min,
            "f-cooldown": (f"paused {c.cooldown_s:.0f}s" if c.cooldown_s > 0
                           else "half rate" if c.slowed else "none"),
            "f-queued": sum(q.depth for q in snap.queues),
        },
        "tables": {
            "workers": [[w.name, ", ".join(w.queues) or "—",
                         f"{w.in_flight}" + (f" / {w.concurrency}" if w.concurrency else ""),
                         "—" if w.heartbeat_age_s is None else duration(w.heartbeat_age_s)]
                        for w in snap.workers],
            "queues": [[q.name, str(q.depth), duration(q.oldest_age_s)] for q in snap.queues],
            "tenants": [[t.tenant, str(t.running), str(t.queued), str(t.submitted)]
                        for t in snap.tenants],
        },
    }


@router.get("/fleet")
def fleet(request: Request, who: Who) -> HTMLResponse:
    snap = snapshot(request, who)
    return page(request, "fleet.html", who=who, nav="fleet", snap=snap, f=figures(snap))


@router.get("/fleet/live")
async def fleet_live(request: Request, who: Who) -> StreamingResponse:
    slots = sse.StreamSlots(request.app.state)
    slots.check()
    return StreamingResponse(slots.hold(_frames(request, who), session_valid(request)),
                             media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _frames(request: Request, who: Viewer) -> AsyncIterator[bytes]:
    last: dict[str, Any] | None = None
    yield b"retry: 2000\n\n"
    while True:
        now = figures(await run_in_threadpool(snapshot, request, who))
        yield (f"data: {json.dumps(now)}\n\n".encode() if now != last else b": same\n\n")
        last = now
        await asyncio.sleep(LIVE_POLL_S)
