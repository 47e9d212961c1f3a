"""/v1/batches: many tasks in one request, on the CLI's batch records (`producer/batch.py`).

The body is JSONL (`application/x-ndjson`: one task per line, AgentTask fields plus an
optional `id`), a JSON array of such objects, or a JSON object `{"tasks": [...],
"defaults": {...}, "prompt_template": "..."}`. Every line is validated (and bound to the
caller's tenant, as single submits are) before anything is submitted; the answer to a bad
batch lists every bad line. Inputs get the keys the CLI gives them (`id`, else
`line-<n>`), so `/results` is the CLI's results file: one JSON line per finished input,
`id`, `line`, then the AgentResult, in input order.

A batch's id is derived from the tenant and the `Idempotency-Key` header (else the body
and options): posting the same batch again resumes it and submits nothing twice. The CLI's
`--max-cost` / `--max-failures` need a process that follows the batch; over HTTP there is
none, so those options are not offered here (cancel the batch instead).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from producer.api import Client
from producer.batch import Batch, BatchInput, batch_key, parse_inputs
from producer.http import sse
from producer.http.auth import Caller, require, still_valid
from producer.http.problems import Problem, not_found
from producer.http.tasks import ERRORS, PROBLEM, bind_to_caller, charge
from sandqueue import callbacks
from sandqueue.contract import FINAL_STATUSES, AgentTask
from sandqueue.store import as_text

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERRORS)
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines",
               "text/plain")
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [
        {"type": "array", "items": {"type": "object"}},
        {"type": "object", "properties": {
            "tasks": {"type": "array", "items": {"type": "object"}},
            "defaults": {"type": "object"}, "prompt_template": {"type": "string"},
            "callback_url": {"type": "string"}},
         "required": ["tasks"]}]}},
    "application/x-ndjson": {"schema": {"type": "string"}}}}}


class BatchSubmitted(BaseModel):
    id: str
    total: int
    submitted: int
    links: dict[str, str]


def _links(batch_id: str) -> dict[str, str]:
    base = f"/v1/batches/{batch_id}"
    return {"self": base, "results": f"{base}/results", "events": f"{base}/events",
            "cancel": f"{base}/cancel"}


def _body(raw: bytes, content_type: str) -> tuple[str, dict[str, Any], str | None, Any]:
    """(JSONL text, defaults, prompt template, callback URL) of a batch body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Problem(400, "bad_request", f"the body is not UTF-8 ({e.reason})") from e
    if content_type.split(";")[0].strip().lower() in JSONL_TYPES:
        return text, {}, None, None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise Problem(400, "bad_request", "the body is not JSON; send a JSON array of tasks, "
                      "or JSONL with Content-Type: application/x-ndjson") from e
    callback_url = None
    if isinstance(value, dict) and isinstance(value.get("tasks"), list):
        defaults, template = value.get("defaults") or {}, value.get("prompt_template")
        callback_url = value.get("callback_url")
        if not isinstance(defaults, dict) or not isinstance(template, str | None):
            raise Problem(422, "invalid_task", "defaults must be an object and "
                          "prompt_template a string")
        value = value["tasks"]
    else:
        defaults, template = {}, None
    if not isinstance(value, list):
        raise Problem(422, "invalid_task", "send a JSON array of tasks, or an object with "
                      "a `tasks` array")
    return "\n".join(json.dumps(v) for v in value), defaults, template, callback_url


def _callback(request: Request, caller: Caller, url: Any) -> tuple[str, str] | None:
    """The batch's completion webhook: (URL, the API key's sealed webhook secret)."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise Problem(422, "invalid_task", "callback_url must be a string (an http(s) URL)")
    why = callbacks.refusal(url, allow_private=request.app.state.settings.webhook_allow_private)
    if why:
        raise Problem(422, "invalid_task", why)
    if caller.key.webhook_secret is None:
        raise Problem(422, "invalid_task", "callback_url: this API key has no webhook secret "
                      "(it was made without SANDQUEUE_SECRET_KEYS); ask for a new key")
    return url, caller.key.webhook_secret


def _batch_id(tenant: str, idempotency_key: str | None, raw: bytes) -> str:
    digest = hashlib.sha256(f"{tenant}\0".encode())
    digest.update(idempotency_key.encode() if idempotency_key else raw)
    return digest.hexdigest()[:16]


def owned_batch(request: Request, caller: Caller, batch_id: str) -> Batch:
    client: Client = request.app.state.client
    batch = Batch(client, batch_id[:64])
    meta = batch.meta()
    if not meta or not caller.owns(meta.get("tenant")):  # an admin owns every existing one
        raise not_found(f"batch {batch_id[:64]}")
    return batch


@router.post("", status_code=202, response_model=BatchSubmitted, openapi_extra=_BODY_DOC,
             responses={413: {"description": "body too large", **PROBLEM},
                        422: {"description": "invalid lines, all listed", **PROBLEM},
                        429: {"description": "submit rate limit", **PROBLEM}})
async def submit_batch(request: Request, caller: Annotated[Caller, Depends(require("submit"))],
                       idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")]
                       = None,
                       callback_url: Annotated[str | None, Query(
                           description="POST the batch's summary here when its last task "
                           "ends (a JSON body may carry it as `callback_url` instead)")] = None,
                       ) -> BatchSubmitted:
    """Validate every line, then submit them all; posting it again resumes it."""
    raw = await request.body()
    text, defaults, template, in_body = _body(raw, request.headers.get("content-type", ""))
    hook = _callback(request, caller, in_body if in_body is not None else callback_url)
    client: Client = request.app.state.client

    def prepare(fields: dict[str, Any]) -> AgentTask:
        allow_private = request.app.state.settings.webhook_allow_private
        return client.prepare(bind_to_caller(client.build(fields), caller, None,
                                             allow_private=allow_private, client=client))

    inputs = await run_in_threadpool(parse_inputs, text, "jsonl", prepare=prepare,
                                     defaults=defaults, template=template, source="the body")
    batch = Batch(client, _batch_id(caller.tenant, idempotency_key, raw))
    submitted = await run_in_threadpool(_submit, request, caller, batch, inputs, hook)
    return BatchSubmitted(id=batch.id, total=len(inputs), submitted=submitted,
                          links=_links(batch.id))


def _submit(request: Request, caller: Caller, batch: Batch, inputs: list[BatchInput],
            hook: tuple[str, str] | None) -> int:
    """What `submit_batch` in producer/batch.py does, plus the tenant and line numbers."""
    batch.register(inputs, "http")
    pipe = batch.r.pipeline(transaction=False)
    pipe.hset(batch_key(batch.id), "tenant", caller.tenant)
    pipe.hset(batch_key(batch.id, "lines"), mapping={i.key: i.line for i in inputs})
    pipe.expire(batch_key(batch.id, "lines"), batch.ttl_s)
    # The prepared tasks (secrets sealed), so the dashboard can run failed inputs again.
    pipe.hset(batch_key(batch.id, "tasks"),
              mapping={i.key: i.task.model_dump_json(exclude_defaults=True) for i in inputs})
    pipe.expire(batch_key(batch.id, "tasks"), batch.ttl_s)
    pipe.execute()
    if hook is not None:
        batch.set_callback(*hook)
    known = batch.items()
    batch.client.republish_stranded(list(known.values()))
    todo = [i for i in inputs if i.key not in known]
    if todo:
        # One request, one charge: the body limit bounds a batch's size, and a per-task
        # charge would refuse for ever any batch larger than the per-minute limit.
        charge(request, caller, 1)
    submitted = len(batch.submit(todo))
    batch.seal()
    return submitted


@router.get("/{batch_id}")
def get_batch(request: Request, batch_id: str,
              caller: Annotated[Caller, Depends(require("read"))]) -> dict[str, Any]:
    """Counts by status, cost so far, and the batch's state."""
    return _counts(owned_batch(request, caller, batch_id))


_FINAL = {s.value for s in FINAL_STATUSES}


def _all_ended(view: dict[str, Any]) -> bool:
    """Has every input of the batch (`_counts`) ended, whatever its batch status says?"""
    ended = sum(n for s, n in view["by_status"].items() if s in _FINAL)
    return ended >= int(view.get("total") or 0)


def _counts(batch: Batch) -> dict[str, Any]:
    counts = batch.counts()
    view = {k: counts.get(k) for k in ("batch_id", "status", "total", "created_at",
                                       "by_status", "cost_usd", "reason") if k in counts}
    # The batch's Redis hash holds text: numbers go out as JSON numbers.
    if view.get("total") is not None:
        view["total"] = int(view["total"])
    if view.get("created_at") is not None:
        view["created_at"] = float(view["created_at"])
    if view.get("status") == "running" and _all_ended(view):
        view["status"] = "done"  # no follower process marks an HTTP batch done (dashboard too)
    return view


@router.get("/{batch_id}/results", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def batch_results(request: Request, batch_id: str,
                  caller: Annotated[Caller, Depends(require("read"))]) -> StreamingResponse:
    """One JSON line per finished input, in input order (the CLI's results file)."""
    batch = owned_batch(request, caller, batch_id)
    return StreamingResponse(_result_lines(batch), media_type="application/x-ndjson")


def _result_lines(batch: Batch) -> Iterator[bytes]:
    order = batch.input_keys()
    items = batch.items()
    lines = {as_text(k): int(v) for k, v in
             batch.r.hgetall(batch_key(batch.id, "lines")).items()}
    for start in range(0, len(order), 1000):
        part = [k for k in order[start:start + 1000] if k in items]
        found = batch.results([items[k] for k in part])
        out = []
        for key in part:
            result = found.get(items[key])
            if result is not None:
                line = {"id": key, "line": lines.get(key), **result.model_dump(mode="json")}
                out.append(json.dumps(line, ensure_ascii=False) + "\n")
        yield "".join(out).encode()


@router.post("/{batch_id}/cancel", status_code=202)
def cancel_batch(request: Request, batch_id: str,
                 caller: Annotated[Caller, Depends(require("cancel"))]) -> dict[str, Any]:
    """Cancel every task of the batch that has not finished."""
    batch = owned_batch(request, caller, batch_id)
    return {"id": batch.id, "cancelled": batch.cancel()}


@router.get("/{batch_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def follow_batch(request: Request, batch_id: str,
                       caller: Annotated[Caller, Depends(require("read"))]) -> StreamingResponse:
    """Progress as Server-Sent Events: the counts whenever they change, then `done`."""
    batch = await run_in_threadpool(owned_batch, request, caller, batch_id)
    heartbeat_s = request.app.state.settings.api_heartbeat_s
    slots = sse.StreamSlots(request.app.state)  # counted like every other stream
    slots.check()
    return StreamingResponse(slots.hold(_progress(batch, heartbeat_s),
                                        still_valid(request, caller)),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _progress(batch: Batch, heartbeat_s: float, poll_s: float = 1.0
              ) -> AsyncIterator[bytes]:
    last: list[dict[str, Any] | None] = [None]

    async def step() -> tuple[bytes | None, bool]:
        counts = await run_in_threadpool(_counts, batch)
        done = _all_ended(counts)
        chunk = b""
        if counts != last[0]:
            last[0] = counts
            chunk = f"data: {json.dumps({'phase': 'progress', **counts})}\n\n".encode()
        if done:
            chunk += f"data: {json.dumps({'phase': 'done', **counts})}\n\n".encode()
        return chunk or None, done

    return sse.polled(step, heartbeat_s, poll_s)
