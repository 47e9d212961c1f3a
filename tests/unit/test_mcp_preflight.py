"""The MCP preflight against a gateway that behaves like docker/mcp-gateway behind E2B's edge
(tests/fakes/mcp_gateway.py cites the source of each behaviour)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from sandqueue import errors
from tests.fakes.mcp_gateway import FakeMcpGateway, edge_port_closed, edge_transitioning
from worker.sandbox.mcp_preflight import Gateway, wait_ready

URL = "https://50005-sbx1.e2b.app/mcp"
TOKEN = "gw-token-123"


def gateway(handler: Callable[[httpx.Request], httpx.Response]) -> Gateway:
    return Gateway(httpx.Client(transport=httpx.MockTransport(handler)), URL, TOKEN)


@pytest.mark.parametrize("sse", [True, False])
def test_lists_tools_over_sse_or_json(sse: bool) -> None:
    fake = FakeMcpGateway(TOKEN, sse=sse)
    assert wait_ready(gateway(fake), ["notion"], 5) == ["search", "create_page"]
    methods = [r.content for r in fake.requests]
    assert len(methods) == 3  # initialize, initialized, tools/list
    # the session id from initialize is sent on the later requests; no Origin, ever
    assert all(r.headers.get("mcp-session-id") for r in fake.requests[1:])
    assert not any("origin" in r.headers for r in fake.requests)


def test_follows_tools_list_pages() -> None:
    fake = FakeMcpGateway(TOKEN, tools=[f"t{i}" for i in range(7)], page_size=3)
    assert wait_ready(gateway(fake), ["x"], 5) == [f"t{i}" for i in range(7)]


def test_a_gateway_whose_tools_list_stays_empty_ends_gateway_timeout() -> None:
    fake = FakeMcpGateway(TOKEN, tools=["mcp-find", "mcp-add"])  # management tools only
    t0 = time.monotonic()
    with pytest.raises(errors.GatewayTimeout) as e:
        wait_ready(gateway(fake), ["notion", "githubOfficial"], 0.5)
    assert time.monotonic() - t0 < 3
    assert e.value.retryable
    assert "notion, githubOfficial" in e.value.message and "no tools" in e.value.message


def test_waits_through_the_edge_until_the_gateway_serves() -> None:
    fake = FakeMcpGateway(TOKEN)
    answers = [edge_port_closed("sbx1"), edge_transitioning("sbx1")]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else fake(request)

    assert wait_ready(gateway(handler), ["notion"], 10) == ["search", "create_page"]


def test_502_and_409_are_never_taken_for_ready() -> None:
    for answer in (edge_port_closed, edge_transitioning):
        with pytest.raises(errors.GatewayTimeout) as e:
            wait_ready(gateway(lambda r, a=answer: a("sbx1")), ["notion"], 0.3)  # type: ignore[misc]
        assert "HTTP 502" in e.value.message or "HTTP 409" in e.value.message


def test_a_refused_token_is_a_permanent_auth_error_at_once() -> None:
    fake = FakeMcpGateway("another-token")
    with pytest.raises(errors.AuthError, match="401"):
        wait_ready(gateway(fake), ["notion"], 5)
    assert len(fake.requests) == 1


def test_a_hanging_gateway_is_not_ready_and_bounded() -> None:
    # The gateway listens before it serves HTTP: connections hang (docker/mcp-gateway run.go)
    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(errors.GatewayTimeout, match="ReadTimeout"):
        wait_ready(gateway(hang), ["notion"], 0.3)


def test_the_request_shape_passes_the_gateways_checks() -> None:
    # 415 for any Content-Type but exactly application/json; 400 without both Accept types:
    # the fake refuses both, so a preflight that got them wrong would never be ready
    fake = FakeMcpGateway(TOKEN)
    wait_ready(gateway(fake), ["notion"], 5)
    first = fake.requests[0]
    assert first.headers["content-type"] == "application/json"
    assert "text/event-stream" in first.headers["accept"]
