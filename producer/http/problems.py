"""Errors as RFC 9457 problem details (`application/problem+json`).

Every error answer has `type`, `title`, `status`, `detail` (what is wrong and how to fix it)
and `category`: the sandqueue error category (`invalid_task`, `auth`, ...) or, for errors of
the HTTP layer itself, a short name (`not_found`, `forbidden`, `rate_limited`, ...).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.api import RedisUnavailable
from producer.outbox import IdempotencyConflict
from sandqueue import errors

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://sandqueue.dev/problems/"
SSE_RETRY = b"retry: 5000\n\n: the queue is unreachable; reconnect\n\n"


class Problem(Exception):
    """An error answer: raise it from a route."""

    def __init__(self, status: int, category: str, detail: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.category = category
        self.detail = detail
        self.headers = headers or {}


def problem_response(status: int, category: str, detail: str, *, instance: str | None = None,
                     headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": TYPE_BASE + category, "title": HTTPStatus(status).phrase,
                            "status": status, "detail": detail, "category": category}
    if instance:
        body["instance"] = instance
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def not_found(what: str) -> Problem:
    return Problem(404, "not_found", f"no {what} (it may have expired, or belong to "
                                     "another tenant)")


def describe_validation(errs: list[Any], content_type: str | None = None) -> str:
    """The same wording as `Client.build` (producer/api.py `_describe`), body prefix dropped;
    a body that is not JSON at all says so (and how to send it) instead of pydantic's words."""
    parts = []
    for err in errs[:10]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        whole_body = list(err.get("loc", ())) == ["body"]
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "")
            return (f"the body is not valid JSON ({why} at character {loc[-1] if loc else 0}); "
                    'send a JSON object such as {"prompt": "..."}')
        if whole_body and err.get("type") == "missing":
            return 'the body is empty; send a JSON object such as {"prompt": "..."}'
        media = (content_type or "").split(";")[0].strip().lower()
        if whole_body and media != "application/json" and not media.endswith("+json"):
            return (f"the body must be JSON sent with `Content-Type: application/json` (this "
                    f"request's is {media or 'missing'}; with curl add "
                    "-H 'Content-Type: application/json')")
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'task'}: {msg}")
    # A bad ?query=, header or path part is not a bad task: say which it is.
    in_body = any(list(e.get("loc", ()))[:1] == ["body"] for e in errs[:10])
    return ("invalid task: " if in_body else "invalid request: ") + "; ".join(parts)


_HTTP_CATEGORY = {400: "bad_request", 401: "auth", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 409: "conflict", 413: "too_large",
                  415: "unsupported_media_type", 422: "invalid_task", 429: "rate_limited"}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem answer."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem) -> JSONResponse:
        return problem_response(e.status, e.category, e.detail, instance=request.url.path,
                                headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return problem_response(422, errors.InvalidTask.category.value,
                                describe_validation(list(e.errors()),
                                                    request.headers.get("content-type")),
                                instance=request.url.path)

    @app.exception_handler(errors.InvalidTask)
    async def _invalid_task(request: Request, e: errors.InvalidTask) -> JSONResponse:
        status = 409 if isinstance(e.__cause__, IdempotencyConflict) else 422
        return problem_response(status, e.category.value, e.message, instance=request.url.path)

    @app.exception_handler(RedisUnavailable)
    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, e: Exception) -> Response:
        if "text/event-stream" in request.headers.get("accept", ""):
            # EventSource (a dashboard page, a browser or `eventsource` client) gives up for
            # good on any other answer; this one makes it reconnect, with its Last-Event-ID.
            return Response(SSE_RETRY, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        # The message names the Redis URL, which may carry a password: callers get less.
        return problem_response(503, "unavailable", "the queue is unreachable; try again",
                                instance=request.url.path, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        category = _HTTP_CATEGORY.get(e.status_code, "error")
        return problem_response(e.status_code, category, str(e.detail),
                                instance=request.url.path, headers=dict(e.headers or {}))
