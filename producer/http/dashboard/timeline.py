"""A task's phases from its events: when each milestone happened and how long each phase took.

The worker publishes `started`, `sandbox_created`, `gateway_ready`, `agent_started` and
`result` (after the producer's `queued`); a retried attempt starts again at `retrying`. The
time between two milestones is the phase the first one opens (queued: from `queued` to
`started`). `static/dash.js` applies the same labels to events that arrive live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MILESTONES = {
    "queued": "queued",
    "started": "picked up by a worker",
    "retrying": "retrying",
    "sandbox_created": "sandbox created",
    "gateway_ready": "MCP gateway ready",
    "agent_started": "agent running",
    "handed_back": "handed back to the queue",
    "result": "result",
}
PHASE_OF = {
    "queued": "queue wait",
    "started": "sandbox start",
    "retrying": "backoff",
    "sandbox_created": "gateway start",
    "gateway_ready": "agent start",
    "agent_started": "agent run",
    "handed_back": "queue wait",
}
"""The phase a milestone opens (it lasts until the next milestone)."""


@dataclass
class Milestone:
    phase: str
    label: str
    ts: float
    since_prev_s: float | None
    detail: str


def milestones(events: list[dict[str, Any]]) -> list[Milestone]:
    out: list[Milestone] = []
    for event in events:
        phase = str(event.get("phase"))
        if phase not in MILESTONES:
            continue
        ts = float(event.get("ts") or 0)
        label = MILESTONES[phase]
        if phase == "result":
            label = f"result: {event.get('status', '?')}"
        detail = ", ".join(f"{k}={event[k]}" for k in ("attempt", "worker", "error", "sandbox_id")
                           if event.get(k) not in (None, ""))
        out.append(Milestone(phase, label, ts, ts - out[-1].ts if out else None, detail))
    return out


def phase_totals(marks: list[Milestone], now: float | None = None) -> list[tuple[str, float]]:
    """Seconds per phase, summed over attempts, in the order phases first happened; with
    `now`, the phase still open (the task runs) counts up to it."""
    totals: dict[str, float] = {}
    ends = [m.ts for m in marks[1:]] + ([now] if now is not None else [])
    for here, end in zip(marks, ends, strict=False):
        name = PHASE_OF.get(here.phase)
        if name is not None:
            totals[name] = totals.get(name, 0.0) + max(0.0, end - here.ts)
    return list(totals.items())


def tool_calls(events: list[dict[str, Any]]) -> list[tuple[float, str]]:
    return [(float(e.get("ts") or 0), str(e.get("name", "?"))) for e in events
            if e.get("phase") == "tool_call"]
