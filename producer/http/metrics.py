"""`GET /metrics`: Prometheus text format. This process's counters (tasks it accepted), and
the fleet-wide gauges read from Redis at each scrape (`sandqueue/metrics.py`).

Open unless `SANDQUEUE_METRICS_TOKEN` is set: Prometheus scrapes from inside the deployment's
network and most setups give it no credentials, but the page names tenants and what they
spent, so a deployment whose serve port is reachable from outside sets a token (Prometheus:
`authorization: {credentials: ...}` in the scrape config). API keys are not used for it: a
scraper is not a tenant, and an admin key would give it far more than it needs.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from producer.http import problems
from sandqueue import metrics


def metrics_endpoint(request: Request) -> Response:
    """Sync on purpose: FastAPI runs it in its thread pool, where the blocking Redis reads
    of the fleet snapshot do not hold up the event loop."""
    token = request.app.state.settings.metrics_token
    if token is not None:
        expected = f"Bearer {token.get_secret_value()}".encode()
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return problems.problem_response(
                401, "auth", "send SANDQUEUE_METRICS_TOKEN as `Authorization: Bearer <token>`",
                instance="/metrics", headers={"WWW-Authenticate": "Bearer"})
    return Response(metrics.render(request.app.state.fleet), media_type=CONTENT_TYPE_LATEST)
