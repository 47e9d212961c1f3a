"""Is the MCP gateway ready? Ask it the way an MCP client will: over streamable HTTP.

"Any answer below 500" is not readiness: the Docker MCP gateway opens its port before it
has started its servers, and E2B's edge answers for it while the port is closed. So the
preflight speaks MCP (spec 2025-06-18, basic/transports): `initialize` (keeping the
`Mcp-Session-Id` it returns), `notifications/initialized`, then `tools/list` (following
`nextCursor`). Ready means tools are listed.

What the other side really does (docker/mcp-gateway `pkg/gateway/auth.go`, `transport.go`
and its Go MCP SDK `mcp/streamable.go`; e2b-dev/infra `packages/shared/pkg/proxy`):
- answers are Server-Sent Events by default (`event: message` / `data: {...}`), or JSON;
- a missing or wrong bearer token is 401 (`WWW-Authenticate: Bearer realm="MCP Gateway"`);
  an `Origin` header that is not localhost is 403, so none is sent;
- `Content-Type` must be exactly `application/json` (415) and `Accept` must list both
  `application/json` and `text/event-stream` (400);
- an unknown session is 404: start over;
- E2B's edge answers 502 ("port is not open", or "sandbox was not found") and 409 (a paused
  sandbox still transitioning): not ready, never a gateway answer;
- tools are not prefixed by server, so tools cannot be told apart by server name: ready
  means at least one tool besides the gateway's own management tools.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from sandqueue import errors

PROTOCOL_VERSION = "2025-06-18"
MANAGEMENT_TOOLS = frozenset({"mcp-find", "mcp-add", "mcp-remove", "mcp-config-set",
                              "mcp-exec", "mcp-create-profile", "mcp-activate-profile",
                              "code-mode"})
"""The gateway's own dynamic-management tools (docker/mcp-gateway dynamic_mcps.go): they
say nothing about the servers a task asked for."""
MAX_PAGES = 50


class NotReady(Exception):
    """The gateway (or the edge in front of it) cannot serve yet; ask again later."""


@dataclass
class Gateway:
    """One MCP client session against the gateway, for the preflight only."""

    http: httpx.Client
    url: str
    token: str
    request_timeout_s: float = 5.0
    session_id: str | None = None
    _next_id: int = 0

    def tools(self) -> list[str]:
        """initialize, initialized, tools/list (all pages): the tool names it serves."""
        self.session_id = None
        init = self._request("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "sandqueue-preflight", "version": "1"}})
        if not isinstance(init, dict) or "protocolVersion" not in init:
            raise NotReady(f"initialize answered {str(init)[:200]}")
        self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        names: list[str] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = self._request("tools/list", {"cursor": cursor} if cursor else {})
            names += [str(t["name"]) for t in (page or {}).get("tools") or []
                      if isinstance(t, dict) and t.get("name")]
            cursor = (page or {}).get("nextCursor")
            if not cursor:
                break
        return names

    def _request(self, method: str, params: dict[str, Any]) -> Any:
        self._next_id += 1
        request_id = self._next_id
        response = self._post({"jsonrpc": "2.0", "id": request_id, "method": method,
                               "params": params})
        message = _find_reply(response, request_id)
        if message is None:
            raise NotReady(f"{method}: no JSON-RPC answer in the response")
        if "error" in message:
            raise NotReady(f"{method}: {message['error']}")
        return message.get("result")

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}",
                   "Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream"}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = PROTOCOL_VERSION
        try:
            response = self.http.post(self.url, content=json.dumps(body), headers=headers,
                                      timeout=self.request_timeout_s)
        except httpx.HTTPError as e:
            # The gateway accepts connections before it serves HTTP: a hang is "not yet".
            raise NotReady(type(e).__name__) from e
        _check_status(response)
        if body.get("method") == "initialize":
            self.session_id = response.headers.get("mcp-session-id") or None
        return response


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status in (401, 403):
        raise errors.AuthError(
            f"the MCP gateway refused its bearer token (HTTP {status}): the token the sandbox "
            "reported does not open it; waiting cannot fix that")
    if status in (409, 502, 503, 504):
        raise NotReady(f"HTTP {status}{_edge_message(response)}")
    if status == 404:
        raise NotReady("HTTP 404 (session not found or no MCP endpoint yet)")
    if status >= 400:
        raise NotReady(f"HTTP {status}: {response.text[:200]}")


def _edge_message(response: httpx.Response) -> str:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        return ""
    return f" ({message})" if message else ""


def _find_reply(response: httpx.Response, request_id: int) -> dict[str, Any] | None:
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if kind == "text/event-stream":
        messages: Iterator[Any] = _sse_messages(response.text)
    else:
        try:
            messages = iter([response.json()])
        except ValueError:
            return None
    for message in messages:
        if isinstance(message, dict) and message.get("id") == request_id:
            return message
    return None


def _sse_messages(text: str) -> Iterator[Any]:
    """JSON-RPC messages of an SSE body: `data:` lines of an event join with newlines."""
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n")
                if line.startswith("data:")]
        if not data:
            continue
        try:
            yield json.loads("\n".join(data))
        except ValueError:
            continue


def wait_ready(gateway: Gateway, servers: list[str], timeout_s: float) -> list[str]:
    """Poll until the gateway lists tools; returns their names. Raises GatewayTimeout
    naming what is missing once `timeout_s` is spent, AuthError at once for a refused
    token."""
    deadline = time.monotonic() + timeout_s
    delay, last = 0.2, "no answer"
    while True:
        left = deadline - time.monotonic()
        gateway.request_timeout_s = max(0.5, min(5.0, left))
        try:
            tools = [t for t in gateway.tools() if t not in MANAGEMENT_TOOLS]
            if tools:
                return tools
            last = "tools/list listed no tools yet"
        except NotReady as e:
            last = str(e)
        if time.monotonic() + delay > deadline:
            wanted = ", ".join(servers) or "the task's servers"
            raise errors.GatewayTimeout(
                f"the MCP gateway did not list tools for {wanted} within {timeout_s:.0f}s "
                f"(last: {last}); raise SANDQUEUE_GATEWAY_READY_TIMEOUT_S if servers start "
                "slowly")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
