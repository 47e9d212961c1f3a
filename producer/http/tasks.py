"""/v1/tasks: submit, read, long-poll the result, follow the events, cancel, list.

A submit goes through the same `Client.submit` as the CLI and the Python API (validation,
sealing, the outbox's race-safe idempotency), after three checks that only the HTTP side
needs: the tenant label comes from the API key, the task's `${NAME}` references must be on
the key's allow-list, and the tenant's submit rate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from producer.api import STRANDED_AFTER_S, Client
from producer.http import records, sse
from producer.http.auth import Caller, require, still_valid
from producer.http.models import CancelOutcome, Pending, Submitted, TaskPage, TaskView, links, view
from producer.http.problems import Problem, not_found
from producer.outbox import TENANT_LABEL
from sandqueue import callbacks, catalog, errors, keys
from sandqueue.contract import AgentResult, AgentTask, TaskStatus

PROBLEM = {"content": {"application/problem+json": {"schema": {
    "type": "object", "required": ["type", "title", "status", "detail", "category"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer"}, "detail": {"type": "string"},
                   "category": {"type": "string"}, "instance": {"type": "string"}}}}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "a malformed cursor, label, Last-Event-ID or body", **PROBLEM},
    401: {"description": "no, unknown, revoked or expired API key", **PROBLEM},
    403: {"description": "the API key lacks the scope", **PROBLEM},
    404: {"description": "no such task, or another tenant's", **PROBLEM},
    422: {"description": "invalid task or parameters", **PROBLEM},
    503: {"description": "Redis unreachable", **PROBLEM},
}
router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=ERRORS)
IDEMPOTENCY_KEY_MAX = 180


def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


def env_references(value: Any) -> set[str]:
    """Every `${NAME}` in a task's MCP config or envs: a worker resolves both."""
    if isinstance(value, str):
        match = catalog.ENV_REF.match(value)
        return {match.group(1)} if match else set()
    if isinstance(value, dict):
        return set().union(*(env_references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(env_references(v) for v in value))
    return set()


def bind_callback(task: AgentTask, caller: Caller, allow_private: bool) -> dict[str, Any]:
    """The callback fields of the task as submitted: the URL checked (SSRF), the API key's
    sealed webhook secret to sign with."""
    if task.callback_secret is not None:
        raise errors.InvalidTask("callback_secret: set from your API key (its webhook secret); "
                                 "leave it out")
    if task.callback_url is None:
        return {}
    why = callbacks.refusal(task.callback_url, allow_private=allow_private)
    if why:
        raise errors.InvalidTask(why)
    if caller.key.webhook_secret is None:
        raise errors.InvalidTask("callback_url: this API key has no webhook secret (it was "
                                 "made without SANDQUEUE_SECRET_KEYS); ask for a new key")
    return {"callback_secret": caller.key.webhook_secret}


def bind_to_caller(task: AgentTask, caller: Caller, idempotency_key: str | None, *,
                   allow_private: bool = False, client: Client | None = None) -> AgentTask:
    """The task as the caller's tenant submits it, or InvalidTask saying what to change.
    With `client`, a `parent_id` must name one of the caller's own tasks (another tenant's
    is "not known", as everywhere in the API)."""
    if task.parent_id is not None and client is not None:
        record = client.store.get(task.parent_id)
        if not record or not caller.owns(record.get("tenant")):
            raise errors.InvalidTask(f"parent_id: no task {task.parent_id} is known")
    asked = task.labels.get(TENANT_LABEL)
    if asked is not None and asked != caller.tenant:
        raise errors.InvalidTask(f"labels.{TENANT_LABEL}: set from your API key (tenant "
                                 f"{caller.tenant!r}); leave it out")
    # A repo token is a worker variable sent to the repo's host: the same allow-list.
    repo_token = {task.repo.token[2:-1]} if task.repo and task.repo.token else set()
    # `envs` too: a worker resolves `${NAME}` there and hands the value to the sandbox.
    referenced = env_references(task.mcp) | env_references(task.envs) | repo_token
    refused = sorted(referenced - caller.key.allow_env)
    if refused:
        allowed = ", ".join(sorted(caller.key.allow_env)) or "none"
        raise errors.InvalidTask(
            f"mcp/envs/repo.token: this API key may not reference "
            f"{', '.join('${' + n + '}' for n in refused)}"
            f" (allowed: {allowed}); ask for a key created with --allow-env")
    key = idempotency_key or task.idempotency_key
    if idempotency_key and task.idempotency_key and idempotency_key != task.idempotency_key:
        raise errors.InvalidTask("the Idempotency-Key header and the body's idempotency_key "
                                 "differ; give one of them")
    if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
        raise errors.InvalidTask(f"idempotency key is over {IDEMPOTENCY_KEY_MAX} characters")
    update: dict[str, Any] = {"labels": {**task.labels, TENANT_LABEL: caller.tenant},
                              **bind_callback(task, caller, allow_private)}
    if key is not None:
        # Per tenant: one tenant's key can neither collide with nor reveal another's task.
        update["idempotency_key"] = f"t:{caller.tenant}:{key}"
    return task.model_copy(update=update)


def charge(request: Request, caller: Caller, count: int) -> None:
    limit = caller.key.max_queued
    if limit is not None:
        open_now = _client(request).outbox.open_count(caller.tenant, limit)
        if open_now + count > limit:
            raise Problem(429, "rate_limited", f"tenant {caller.tenant!r} has {open_now} "
                          f"unfinished task(s), its key allows {limit}; try again when some "
                          "have finished", headers={"Retry-After": "5"})
    per_min = caller.key.submit_rate_per_min or request.app.state.settings.api_submit_rate_per_min
    retry_after = request.app.state.apikeys.charge_submits(caller.tenant, count, per_min)
    if retry_after is not None:
        raise Problem(429, "rate_limited", f"tenant {caller.tenant!r} may submit {per_min} "
                      "tasks per minute; try again later",
                      headers={"Retry-After": str(int(retry_after + 0.999))})


@router.post("", status_code=202, response_model=Submitted,
             responses={409: {"description": "idempotency key used for another task", **PROBLEM},
                        413: {"description": "body too large", **PROBLEM},
                        422: {"description": "invalid task", **PROBLEM},
                        429: {"description": "submit rate limit", **PROBLEM}})
def submit_task(request: Request, response: Response, task: Annotated[AgentTask, Body()],
                caller: Annotated[Caller, Depends(require("submit"))],
                idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
                ) -> Submitted:
    """Enqueue one agent task (the same `AgentTask` as the CLI and Python API)."""
    client = _client(request)
    task = bind_to_caller(task, caller, idempotency_key, client=client,
                          allow_private=request.app.state.settings.webhook_allow_private)
    charge(request, caller, 1)
    handle = client.submit(task)
    status = TaskStatus.QUEUED
    if handle.duplicate:
        status = TaskStatus(client.store.get(handle.id).get("status") or "unknown")
    response.headers["Location"] = f"/v1/tasks/{handle.id}"
    return Submitted(id=handle.id, status=status, duplicate=handle.duplicate,
                     links=links(handle.id))


@router.post("/{task_id}/follow-up", status_code=202, response_model=Submitted,
             responses={409: {"description": "idempotency key used for another task", **PROBLEM},
                        422: {"description": "invalid task, or one that cannot be continued",
                              **PROBLEM},
                        429: {"description": "submit rate limit", **PROBLEM}})
def follow_up(request: Request, response: Response, task_id: str,
              task: Annotated[AgentTask, Body()],
              caller: Annotated[Caller, Depends(require("submit"))],
              idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
              ) -> Submitted:
    """A new task continuing this task's agent conversation (its `parent_id`)."""
    records.owned_record(_client(request), caller, task_id)
    if task.parent_id not in (None, task_id):
        raise errors.InvalidTask("parent_id: the path names the task to continue; leave it out")
    return submit_task(request, response, task.model_copy(update={"parent_id": task_id}),
                       caller, idempotency_key)


@router.get("", response_model=TaskPage)
def list_tasks(request: Request, caller: Annotated[Caller, Depends(require("read"))],
               status: TaskStatus | None = None,
               label: Annotated[list[str] | None, Query(description="KEY=VALUE, repeatable")]
               = None,
               batch: str | None = None, limit: Annotated[int, Query(ge=1, le=200)] = 50,
               cursor: str | None = None,
               tenant: Annotated[str | None, Query(
                   description="an admin key: only this tenant's tasks (default: every "
                   "tenant's)")] = None) -> TaskPage:
    """The caller's tasks (an `admin` key: every tenant's), newest first, filtered;
    `next_cursor` pages on."""
    keep = task_filter(status, label, batch)
    found, next_cursor = records.page(_client(request).redis, caller.tenant, limit=limit,
                                      cursor=cursor, keep=keep, index=_index(caller, tenant))
    return TaskPage(items=[view(t, r, None) for t, r in found], next_cursor=next_cursor)


def task_filter(status: TaskStatus | None, label: list[str] | None,
                batch: str | None) -> Callable[[dict[str, str]], bool]:
    """Which records a listing keeps (the API's and the dashboard's): status, labels
    given as KEY=VALUE, batch id."""
    wanted: dict[str, str] = {}
    for item in label or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise Problem(400, "bad_request", f"label {item!r}: write it as KEY=VALUE")
        wanted[name] = value
    if batch is not None:
        wanted["batch"] = batch

    def keep(record: dict[str, str]) -> bool:
        if status is not None and record.get("status") != status.value:
            return False
        if not wanted:
            return True
        have = view("", record, None).labels
        return all(have.get(k) == v for k, v in wanted.items())

    return keep


def _index(caller: Caller, tenant: str | None) -> str:
    """Which listing index the caller reads: its own tenant's; an admin's, the one asked
    for or all of them. Another tenant's, asked by a non-admin key, does not exist (404)."""
    if tenant is not None and not caller.owns(tenant):
        raise not_found(f"tenant {tenant[:100]!r}")
    if caller.admin:
        return keys.tenant_index(tenant) if tenant else keys.TASK_INDEX
    return keys.tenant_index(caller.tenant)


@router.get("/{task_id}", response_model=TaskView)
def get_task(request: Request, task_id: str,
             caller: Annotated[Caller, Depends(require("read"))]) -> TaskView:
    """Status, labels and timestamps; the result once the task has ended."""
    client = _client(request)
    record = records.owned_record(client, caller, task_id)
    ended = TaskStatus(record.get("status") or "unknown").is_final
    return view(task_id, record, records.read_result(client, task_id) if ended else None)


@router.get("/{task_id}/result", response_model=AgentResult,
            responses={202: {"model": Pending, "description": "not finished within `wait`"}})
async def get_result(request: Request, task_id: str,
                     caller: Annotated[Caller, Depends(require("read"))],
                     wait: Annotated[float, Query(ge=0, le=3600, description="seconds to wait "
                                                  "for the end (capped by the deployment)")] = 0,
                     ) -> Any:
    """The AgentResult; with `wait`, answers as soon as the task ends (long-poll)."""
    client = _client(request)
    await run_in_threadpool(records.owned_record, client, caller, task_id)
    # As `TaskHandle.wait()`: a task whose producer died before publishing it goes out now.
    await run_in_threadpool(client.republish_stranded, [task_id], STRANDED_AFTER_S)
    aredis = request.app.state.hub.redis  # short reads share the stream reader's pool
    rkey = records.result_key(client, task_id)

    async def stored() -> dict[str, Any] | None:
        return records.decode_result(await aredis.get(rkey))

    wait = min(wait, request.app.state.settings.api_max_wait_s)
    slots = sse.StreamSlots(request.app.state)
    slots.check()
    request.app.state.open_streams += 1
    try:
        result = await sse.wait_result(request.app.state.hub, task_id, wait, stored)
    finally:
        request.app.state.open_streams -= 1
    if result is not None:
        return JSONResponse(result)
    status = (await run_in_threadpool(client.store.get, task_id)).get("status") or "unknown"
    body = Pending(id=task_id, status=TaskStatus(status), detail="not finished yet; ask again "
                   "with ?wait=SECONDS, or follow /events")
    return JSONResponse(body.model_dump(mode="json"), status_code=202,
                        headers={"Retry-After": "1"})


@router.get("/{task_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "SSE; `id:` is the stream entry id"},
                       204: {"description": "Last-Event-ID is the result event or later: "
                             "the stream is over (EventSource stops reconnecting)"}})
async def follow_task(request: Request, task_id: str,
                      caller: Annotated[Caller, Depends(require("read"))],
                      last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                      ) -> Response:
    """Progress events live, as Server-Sent Events, ending with the `result` event."""
    client = _client(request)
    await run_in_threadpool(records.owned_record, client, caller, task_id)
    after = sse.start_after(last_event_id)
    if await sse.had_the_result(request.app.state.hub.redis, task_id, after):
        return Response(status_code=204)
    frames = event_frames(request, task_id, after)
    slots = sse.StreamSlots(request.app.state)
    slots.check()
    return StreamingResponse(slots.hold(frames, still_valid(request, caller)),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def event_frames(request: Request, task_id: str, after: str) -> AsyncIterator[bytes]:
    """The task's SSE frames after `after`, through this process's shared stream reader
    (the API's route and the dashboard's)."""
    hub = request.app.state.hub
    rkey = records.result_key(_client(request), task_id)

    async def stored() -> dict[str, Any] | None:
        return records.decode_result(await hub.redis.get(rkey))  # the reader's pool

    return sse.task_events(hub, task_id, after, request.app.state.settings.api_heartbeat_s,
                           stored)


@router.post("/{task_id}/cancel", status_code=202, response_model=CancelOutcome)
def cancel_task(request: Request, task_id: str,
                caller: Annotated[Caller, Depends(require("cancel"))]) -> CancelOutcome:
    """A queued task never starts; a running one stops within seconds."""
    client = _client(request)
    records.owned_record(client, caller, task_id)
    outcome, status = client.cancel_outcomes([task_id])[task_id]
    if outcome == "unknown":
        raise not_found(f"task {task_id}")
    return CancelOutcome(id=task_id, outcome=outcome,
                         status=TaskStatus(status) if status else None)
