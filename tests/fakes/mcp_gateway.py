"""The Docker MCP gateway's streamable-HTTP endpoint as an httpx handler, with its real quirks.

Each behaviour is taken from the gateway's source (docker/mcp-gateway @ 2bd20fe8:
`pkg/gateway/auth.go`, `transport.go`, `capabilitites.go`; its vendored
modelcontextprotocol/go-sdk v1.4.1 `mcp/streamable.go`):
- bearer auth on every request; missing or wrong -> 401 `Unauthorized` with
  `WWW-Authenticate: Bearer realm="MCP Gateway"`;
- an `Origin` that is not localhost -> 403;
- `Content-Type` must be exactly `application/json` -> else 415;
- `Accept` must contain both `application/json` and `text/event-stream` -> else 400;
- `initialize` returns an `Mcp-Session-Id`; later requests need it (unknown -> 404);
- notifications -> 202 with no body;
- answers are SSE (`event: message`, `data: ...`) by default, JSON when `sse=False`;
- tools are listed under their own names, not prefixed by server; pages via `nextCursor`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class FakeMcpGateway:
    token: str
    tools: list[str] = field(default_factory=lambda: ["search", "create_page"])
    sse: bool = True
    page_size: int = 100
    sessions: set[str] = field(default_factory=set)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        refused = self._refuse(request)
        if refused is not None:
            return refused
        body = json.loads(request.content)
        method = body.get("method")
        if "id" not in body:  # a notification
            return httpx.Response(202)
        if method == "initialize":
            session = uuid.uuid4().hex
            self.sessions.add(session)
            return self._answer(body["id"], {
                "protocolVersion": body["params"]["protocolVersion"],
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "Docker AI MCP Gateway", "version": "2.0.1"}},
                {"Mcp-Session-Id": session})
        if request.headers.get("mcp-session-id") not in self.sessions:
            return httpx.Response(404, text="session not found\n")
        if method == "tools/list":
            return self._answer(body["id"], self._page(body.get("params") or {}))
        return self._answer(body["id"], None, error={"code": -32601,
                                                     "message": "method not found"})

    def _refuse(self, request: httpx.Request) -> httpx.Response | None:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return httpx.Response(401, text="Unauthorized\n",
                                  headers={"WWW-Authenticate": 'Bearer realm="MCP Gateway"'})
        origin = request.headers.get("origin")
        if origin and "localhost" not in origin and "127.0.0.1" not in origin:
            return httpx.Response(403, text="Forbidden: Origin, if set, must be localhost, "
                                            f"127.0.0.1, or ::1, got: {origin}\n")
        if request.headers.get("content-type") != "application/json":
            return httpx.Response(415, text="Content-Type must be 'application/json'\n")
        accept = request.headers.get("accept", "")
        if "application/json" not in accept or "text/event-stream" not in accept:
            return httpx.Response(400, text="Accept must contain both 'application/json' and "
                                            "'text/event-stream'\n")
        return None

    def _page(self, params: dict[str, Any]) -> dict[str, Any]:
        start = int(params.get("cursor") or 0)
        names = self.tools[start:start + self.page_size]
        page: dict[str, Any] = {"tools": [
            {"name": n, "description": f"{n} tool",
             "inputSchema": {"type": "object", "properties": {}}} for n in names]}
        if start + self.page_size < len(self.tools):
            page["nextCursor"] = str(start + self.page_size)
        return page

    def _answer(self, request_id: Any, result: Any, headers: dict[str, str] | None = None,
                error: dict[str, Any] | None = None) -> httpx.Response:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        message.update({"error": error} if error else {"result": result})
        if not self.sse:
            return httpx.Response(200, json=message, headers=headers)
        text = f"event: message\nid: {uuid.uuid4().hex[:8]}\ndata: {json.dumps(message)}\n\n"
        return httpx.Response(200, text=text, headers={
            "Content-Type": "text/event-stream", **(headers or {})})


def edge_port_closed(sandbox_id: str, port: int = 50005) -> httpx.Response:
    """E2B's edge while nothing listens on the port (e2b-dev/infra template/port_closed.go)."""
    return httpx.Response(502, json={"sandboxId": sandbox_id, "message": "The sandbox is "
                                     "running but port is not open", "port": port,
                                     "code": 502})


def edge_transitioning(sandbox_id: str) -> httpx.Response:
    """E2B's edge for a paused sandbox still resuming (sandbox_still_transitioning.go)."""
    return httpx.Response(409, json={"sandboxId": sandbox_id, "message": "The sandbox is still "
                                     "transitioning. Try again in a moment.", "code": 409})
