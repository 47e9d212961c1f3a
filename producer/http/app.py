"""The ASGI app: `create_app()` (uvicorn's factory), health checks, the body size limit.

It holds no state of its own between requests (everything is in Redis), so replicas behind
a load balancer need nothing shared but Redis. Settings come from the environment and
`.env`, as for every other sandqueue process.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api import Client
from producer.apikeys import ApiKeys
from producer.http import artifacts, batches, dashboard, problems, tasks
from producer.http.fanout import StreamHub
from producer.http.metrics import metrics_endpoint
from sandqueue import metrics, tracing
from sandqueue.settings import Settings, load_settings


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, or as soon as a chunked
    body passes it (the rest is never read)."""

    def __init__(self, app: ASGIApp, max_bytes: int, batch_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.batch_max_bytes = batch_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (self.batch_max_bytes if scope["path"].startswith("/v1/batches")
                 else self.max_bytes)
        detail = f"the request body is over {limit} bytes; send less per request"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = problems.problem_response(413, "too_large", detail,
                                                 instance=scope["path"])
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, detail)  # routes and handlers turn it into a problem
            return message

        await self.app(scope, limited, send)


def end_streams_at_exit_signal(hub: StreamHub, stopping: asyncio.Event) -> None:
    """On SIGINT/SIGTERM, end every open event stream and long-poll at once (then pass the
    signal on to uvicorn). uvicorn waits for open responses BEFORE the lifespan's shutdown
    (where the hub closes), so without this each stream held the shutdown up for the whole
    grace and was then cancelled, with a traceback per stream in the log."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals belong to the main thread (an in-process test server has none)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(stopping.set)
            loop.call_soon_threadsafe(hub.drop_all, "the server is shutting down; reconnect")
            previous(signum, frame)

        signal.signal(sig, handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = Client(settings)
        app.state.settings = settings
        app.state.client = client
        app.state.apikeys = ApiKeys(client.redis)
        # Blocking stream reads last up to a heartbeat: the socket timeout must be longer.
        app.state.aredis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, socket_connect_timeout=5,
            socket_timeout=settings.api_heartbeat_s + 30,
            max_connections=settings.api_max_streams + 50, timeout=10))
        app.state.open_streams = 0
        app.state.fleet = metrics.FleetCollector(lambda: client.redis)
        metrics.tenant_label.limit = settings.metrics_max_tenants
        tracing.setup(settings.tracing, "sandqueue-api", settings.tracing_endpoint)
        # One Redis reader for every event stream and long-poll of this process.
        app.state.hub = StreamHub(settings.redis_url)
        app.state.hub.start()
        app.state.stopping = asyncio.Event()  # ends every open stream (sse.StreamSlots)
        end_streams_at_exit_signal(app.state.hub, app.state.stopping)
        try:
            yield
        finally:
            await app.state.hub.close()
            await app.state.aredis.aclose()
            if "celery" in client.__dict__:
                client.celery.close()
            client.redis.close()

    app = FastAPI(title="sandqueue", version="1",
                  summary="Run AI agent tasks in fresh sandboxes: submit, follow, cancel.",
                  lifespan=lifespan)
    problems.install(app)
    app.include_router(tasks.router)
    app.include_router(artifacts.router)  # issue 12
    app.include_router(batches.router)
    dashboard.install(app)  # the web dashboard at / (producer/http/dashboard)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"])
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["health"],
                      responses={503: {"description": "Redis unreachable"}})
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes,
                       batch_max_bytes=settings.api_max_batch_bytes)
    return app


async def healthz() -> dict[str, str]:
    """The process is up (liveness)."""
    return {"status": "ok"}


async def readyz(request: Request) -> Any:
    """Redis answers (readiness): take this replica out of the load balancer otherwise."""
    try:
        await request.app.state.aredis.ping()
    except (aioredis.RedisError, OSError):
        return problems.problem_response(503, "unavailable", "Redis is unreachable",
                                         instance="/readyz")
    return JSONResponse({"status": "ready"})
