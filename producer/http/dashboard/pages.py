"""The dashboard's task pages: log in and out, the task table, one task, cancel, live updates.

Listing reuses the API's index and filter (`records.page`, `tasks.task_filter`): newest
first, one page of rows per request whatever the number of tasks, and a cursor to page on.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from producer.api import Client
from producer.http import records, sse
from producer.http.dashboard import timeline
from producer.http.dashboard.render import SECURITY_HEADERS, page
from producer.http.dashboard.session import (
    COOKIE,
    LoginRequired,
    Viewer,
    check_form,
    clear_login,
    end_session,
    foreign_origin,
    session_valid,
    set_login,
    start_session,
    viewer,
)
from producer.http.models import view
from producer.http.problems import Problem
from producer.http.tasks import event_frames, task_filter
from sandqueue import keys
from sandqueue.contract import TaskStatus
from sandqueue.events import decode_entry
from sandqueue.store import TaskStore, as_text

router = APIRouter(include_in_schema=False)
PAGE_ROWS = 50
LIVE_IDS_MAX = 200
LIVE_POLL_S = 1.0
SSE_HEADERS = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
Who = Annotated[Viewer, Depends(viewer)]


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\x00-\x1f\x7f\\]*\Z")


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never `//evil.example`, a full URL (an open redirect) or
    control characters (a header split)."""
    return target if target and _LOCAL_PATH.match(target) else "/"


ENDED = {
    "ended": "Your session ended (it expired, or you logged out): log in again.",
    "refused": "Your session ended: its API key was revoked or has expired, or lacks the "
               "`read` scope. Log in with a usable key.",
}
"""Why a page sent the browser back to the login form (`?ended=`): fixed texts, so a link
cannot make the form say anything else."""


@router.get("/login")
def login_form(request: Request, next: str = "/", ended: str = "") -> HTMLResponse:
    return page(request, "login.html", next=_safe_next(next), why=ENDED.get(ended, ""))


@router.post("/login")
def login(request: Request, api_key: Annotated[str, Form(max_length=400)] = "",
          next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    if foreign_origin(request):
        # another site's form must not log this browser in under its key (login CSRF)
        return page(request, "login.html", status_code=403, next="/",
                    why="this login form came from another site; use the dashboard's own")
    presented = api_key.strip()
    key, why = request.app.state.apikeys.authenticate(presented) if presented else (
        None, "enter an API key (make one with `sandqueue apikey create`)")
    if key is None:
        return page(request, "login.html", status_code=401, next=_safe_next(next), why=why)
    if not key.allows("read"):
        return page(request, "login.html", status_code=403, next=_safe_next(next),
                    why="this API key lacks the `read` scope the dashboard needs (make one "
                        "with `sandqueue apikey create --scopes read,...`)")
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_login(request, response, start_session(request.app.state.apikeys, key))
    return response


@router.post("/logout")
def logout(request: Request, who: Who, csrf: Annotated[str, Form()] = "") -> Response:
    check_form(request, who, csrf)
    end_session(request.app.state.apikeys, request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303)
    clear_login(request, response)
    return response


def tenants_of(request: Request, who: Viewer) -> list[str]:
    """The tenants a viewer may list: its own; for an admin, every API key's tenant."""
    if not who.admin:
        return [who.tenant]
    return sorted({k.tenant for k in request.app.state.apikeys.list()} | {who.tenant})


def listing_index(who: Viewer, tenant: str) -> str:
    """The index a tasks page lists (and counts new tasks in): a tenant key's own tenant's,
    whatever it asks for; an admin's, the tenant it names (any: also one no API key has,
    from tasks labelled in the CLI or Python) or, none named, every task's (the same
    all-tasks index `GET /v1/tasks` reads for an admin key)."""
    if not who.admin:
        return keys.tenant_index(who.tenant)
    return keys.tenant_index(tenant) if tenant else keys.TASK_INDEX


@router.get("/")
def tasks_page(request: Request, who: Who, status: str = "", tenant: str = "",
               label: str = "", batch: str = "", cursor: str = "") -> HTMLResponse:
    wanted = TaskStatus(status) if status in {s.value for s in TaskStatus} else None
    labels = [part.strip() for part in label.split(",") if part.strip()]
    try:
        keep = task_filter(wanted, labels, batch.strip() or None)
    except Problem as e:
        return _tasks(request, who, error=e.detail)
    visible = tenants_of(request, who)
    r = _client(request).redis
    if who.admin and tenant and tenant not in visible:
        visible = [*visible, tenant]  # shown, and selected, in the tenant filter
    try:
        rows, after = records.page(r, "", limit=PAGE_ROWS, cursor=cursor or None,
                                   keep=keep, chunk_size=2 * PAGE_ROWS,
                                   index=listing_index(who, tenant))
    except Problem as e:
        return _tasks(request, who, error=e.detail)
    filters = {"status": status, "tenant": tenant, "label": label, "batch": batch}
    shown = [(view(t, rec, None), rec.get("cost_usd"), rec.get("tool_calls")) for t, rec in rows]
    return _tasks(request, who, rows=shown, after=after,
                  filters=filters, tenants=visible, cursor=cursor)


def _tasks(request: Request, who: Viewer, **context: Any) -> HTMLResponse:
    context.setdefault("filters", {})
    context.setdefault("rows", [])
    return page(request, "tasks.html", who=who, statuses=[s.value for s in TaskStatus],
                nav="tasks", status_code=400 if context.get("error") else 200, **context)


def owned(request: Request, who: Viewer, task_id: str) -> dict[str, str]:
    return records.owned_record(_client(request), who.caller, task_id)


@router.get("/tasks/{task_id}")
def task_page(request: Request, task_id: str, who: Who) -> HTMLResponse:
    client = _client(request)
    record = owned(request, who, task_id)
    status = record.get("status") or "unknown"
    ended = status in {s.value for s in TaskStatus if s.is_final}
    result = records.read_result(client, task_id) if ended else None
    raw = client.redis.xrange(keys.events(task_id), count=2000)
    events = [decode_entry(fields) | {"id": as_text(i)} for i, fields in raw]
    marks = timeline.milestones(events)
    info = view(task_id, record, result)
    return page(request, "task.html", who=who, nav="tasks", task=info, record=record,
                result=info.result, events=events, marks=marks,
                phases=timeline.phase_totals(marks, None if ended else time.time()),
                tools=timeline.tool_calls(events),
                attempts=TaskStore.attempt_log(record), ended=ended,
                last_event=events[-1]["id"] if events else "",
                cost=record.get("cost_usd"), worker=record.get("worker"),
                sandbox=record.get("sandbox_id"))


@router.post("/tasks/{task_id}/cancel")
def cancel_task(request: Request, task_id: str, who: Who,
                csrf: Annotated[str, Form()] = "") -> Response:
    check_form(request, who, csrf, "cancel")
    owned(request, who, task_id)
    _client(request).cancel_outcomes([task_id])
    return RedirectResponse(f"/tasks/{task_id}", status_code=303)


@router.get("/tasks/{task_id}/events")
async def task_events(request: Request, task_id: str, who: Who,
                      last_event_id: Annotated[str | None, Query(alias="after")] = None,
                      ) -> Response:
    """The /v1 event stream, for the page's EventSource (which sends the cookie, not a
    Bearer header): from `?after=` (the last event the page was rendered with) on."""
    await run_in_threadpool(owned, request, who, task_id)
    after = sse.start_after(request.headers.get("last-event-id") or last_event_id)
    if await sse.had_the_result(request.app.state.hub.redis, task_id, after):
        return Response(status_code=204)  # the page has the result: EventSource stops
    frames = event_frames(request, task_id, after)
    slots = sse.StreamSlots(request.app.state)
    slots.check()
    return StreamingResponse(slots.hold(frames, session_valid(request)),
                             media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.get("/live/tasks")
async def live_rows(request: Request, who: Who, ids: str = "", newer_than: float = 0.0,
                    tenant: str = "") -> StreamingResponse:
    """Status, attempt, cost and last update of the rows a tasks page shows, whenever they
    change (one HMGET per row per second: bounded by the page, not by the task count), and
    with `newer_than`, how many tasks were submitted since the page's newest row."""
    wanted = [t for t in ids.split(",") if t][:LIVE_IDS_MAX]
    slots = sse.StreamSlots(request.app.state)
    slots.check()
    frames = _row_frames(request.app.state.aredis, who, wanted,
                         listing_index(who, tenant) if newer_than else None, newer_than,
                         request.app.state.settings.api_heartbeat_s)
    return StreamingResponse(slots.hold(frames, session_valid(request)),
                             media_type="text/event-stream",
                             headers=SSE_HEADERS)


_ROW_FIELDS = ("tenant", "status", "attempt", "tool_calls", "cost_usd", "updated_at", "error")


async def _row_frames(aredis: Any, who: Viewer, ids: list[str], index: str | None,
                      newer_than: float, heartbeat_s: float) -> AsyncIterator[bytes]:
    last: dict[str, Any] = {}
    last_newer = [0]

    async def step() -> tuple[bytes | None, bool]:
        pipe = aredis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(keys.task(task_id), *_ROW_FIELDS)
        if index is not None:
            pipe.zcount(index, f"({newer_than!r}", "+inf")
        answers = await pipe.execute()
        rows = {}
        for task_id, values in zip(ids, answers, strict=False):
            row = dict(zip(_ROW_FIELDS, (as_text(v) if v is not None else "" for v in values),
                           strict=True))
            if who.caller.owns(row.pop("tenant") or None):
                rows[task_id] = row
        newer = sum(int(n) for n in answers[len(ids):])
        changed = {t: row for t, row in rows.items() if last.get(t) != row}
        if not changed and newer == last_newer[0]:
            return None, False
        last.update(changed)
        last_newer[0] = newer
        return f"data: {json.dumps({'rows': changed, 'newer': newer})}\n\n".encode(), False

    yield b"retry: 2000\n\n"
    async for chunk in sse.polled(step, heartbeat_s, LIVE_POLL_S):
        yield chunk


def login_redirect(request: Request, e: LoginRequired) -> Response:
    """A page sends the browser to the login form (and back after it); a live stream,
    which no browser shows, just answers 401."""
    path = request.url.path
    if path.startswith("/live/") or path.endswith(("/events", "/live")):
        return Response("log in first", status_code=401, headers=SECURITY_HEADERS)
    target = path + (f"?{request.url.query}" if request.url.query else "")
    ended = f"&ended={e.ended}" if e.why else ""
    response = RedirectResponse(f"/login?next={quote(target, safe='')}{ended}",
                                status_code=303)
    if e.why:  # a cookie that no longer works (revoked, expired, logged out): drop it
        clear_login(request, response)
    return response
