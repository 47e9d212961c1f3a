"""Parse Claude Code's `--output-format stream-json` output as it arrives.

Output comes in chunks that split lines anywhere (even inside a UTF-8 character, which the
SDK's incremental decoder already handles), and the CLI or the shell may print lines that
are not JSON. `LineBuffer` turns chunks into lines; `Transcript` folds events into what the
result needs: init (MCP servers, tools), tool calls, the last text, usage, the result event.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_LINE_CHARS = 8 * 1024 * 1024
"""A longer line without a newline is dropped: a runaway tool output must not eat memory."""


class LineBuffer:
    def __init__(self, max_line_chars: int = MAX_LINE_CHARS) -> None:
        self._partial: list[str] = []
        self._partial_len = 0
        self._max = max_line_chars
        self._discarding = False
        self.dropped_lines = 0

    def feed(self, chunk: str) -> list[str]:
        lines: list[str] = []
        start = 0
        while True:
            nl = chunk.find("\n", start)
            if nl < 0:
                break
            self._append(chunk[start:nl])
            if self._discarding:  # the end of an overlong line: drop it whole
                self._discarding = False
            else:
                lines.append(self._take())
            start = nl + 1
        if start < len(chunk):
            self._append(chunk[start:])
        return lines

    def close(self) -> list[str]:
        """The last line when the stream ended without a newline."""
        if self._discarding or not self._partial:
            self._discarding = False
            return []
        return [self._take()]

    def _append(self, text: str) -> None:
        if self._discarding:
            return
        if self._partial_len + len(text) > self._max:
            self._partial, self._partial_len = [], 0
            self._discarding = True
            self.dropped_lines += 1
            return
        self._partial.append(text)
        self._partial_len += len(text)

    def _take(self) -> str:
        line = "".join(self._partial)
        self._partial, self._partial_len = [], 0
        return line


def parse_line(line: str) -> dict[str, Any] | None:
    """A JSON object, or None for noise (blank lines, banners, partial garbage)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Transcript:
    """What the stream said so far. Fed event by event; safe to read at any moment."""

    init: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    tool_calls: Counter[str] = field(default_factory=Counter)
    last_text: str | None = None
    noise_lines: int = 0
    events: int = 0
    usage_by_message: dict[str, dict[str, int]] = field(default_factory=dict)
    """Usage per model message id. Claude Code streams one API response as one `assistant`
    event per content block, each repeating the response's `message.id` and `usage`
    (documented: code.claude.com/docs/en/agent-sdk/cost-tracking, "deduplicate by ID";
    maintainer on anthropics/claude-code#87303), so summing events counts a response
    1.4-2.5x. The last copy wins: it carries the most complete output count."""
    api_error: str | None = None
    """The kind of API error a synthetic assistant message reported (`rate_limit`, ...)."""
    _anonymous: int = 0

    @property
    def mcp_servers(self) -> list[dict[str, str]]:
        servers = (self.init or {}).get("mcp_servers") or []
        return [
            {"name": str(s.get("name")), "status": str(s.get("status"))}
            for s in servers
            if isinstance(s, dict)
        ]

    @property
    def tools(self) -> list[str]:
        tools = (self.init or {}).get("tools") or []
        return [t for t in tools if isinstance(t, str)]

    def feed_line(self, line: str) -> dict[str, Any] | None:
        event = parse_line(line)
        if event is None:
            if line.strip():
                self.noise_lines += 1
            return None
        self.apply(event)
        return event

    def apply(self, event: dict[str, Any]) -> None:
        self.events += 1
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            self.init = event
        elif kind == "assistant":
            if isinstance(event.get("error"), str):
                self.api_error = event["error"]
            self._assistant(event.get("message") or {})
        elif kind == "result":
            self.result = event

    def _assistant(self, message: dict[str, Any]) -> None:
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "tool_use":
                    self.tool_calls[str(block.get("name", "?"))] += 1
                elif block.get("type") == "text" and isinstance(block.get("text"), str):
                    self.last_text = block["text"]
        usage = message.get("usage")
        if isinstance(usage, dict):
            message_id = message.get("id")
            if not isinstance(message_id, str) or not message_id:
                self._anonymous += 1  # no id to de-duplicate by: count it on its own
                message_id = f"\0anonymous-{self._anonymous}"
            self.usage_by_message[message_id] = {
                k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
