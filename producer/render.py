"""How results look on a terminal, and as JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sandqueue.contract import AgentResult, TaskStatus

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

SIM_BANNER = ("SIMULATED: no E2B sandbox or model was used (SANDQUEUE_SANDBOX=sim or no "
              "E2B_API_KEY); set E2B_API_KEY and ANTHROPIC_API_KEY for real runs")

_STYLE = {
    TaskStatus.SUCCEEDED: "bold green",
    TaskStatus.FAILED: "bold red",
    TaskStatus.TIMED_OUT: "bold red",
    TaskStatus.CANCELLED: "bold yellow",
}


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def print_event(event: dict[str, Any]) -> None:
    """One progress event as a line: time, phase, the interesting fields."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("ts", time.time()))))
    phase = str(event.get("phase", "?"))
    details = {k: v for k, v in event.items() if k not in {"ts", "phase"} and v is not None}
    text = " ".join(f"{k}={v}" for k, v in details.items())
    if phase == "agent_text":
        text = str(details.get("text", ""))[:300].replace("\n", " ")
    out.print(f"[dim]{stamp}[/] [bold]{escape(phase)}[/] {escape(text)}")


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def print_result(result: AgentResult) -> None:
    if result.simulated:
        err.print(f"[bold yellow]{SIM_BANNER}[/]")
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_row("task", result.task_id)
    table.add_row("status", f"[{_STYLE.get(result.status, 'bold')}]{result.status.value}[/]"
                  + ("  [yellow](simulated)[/]" if result.simulated else ""))
    if result.error:
        table.add_row("error", escape(f"{result.error.category.value}: {result.error.message}"
                                      + ("  (retryable)" if result.error.retryable else "")))
    table.add_row("attempts", str(result.attempts))
    if result.sandbox_id:
        table.add_row("sandbox", result.sandbox_id)
    if result.mcp_servers:
        table.add_row("mcp", escape(", ".join(f"{s.name}={s.status}"
                                              for s in result.mcp_servers)))
    if result.tool_calls:
        table.add_row("tool calls", escape(", ".join(f"{t.name} x{t.count}"
                                                     for t in result.tool_calls)))
    if result.num_turns is not None:
        table.add_row("turns", str(result.num_turns))
    if result.total_cost_usd is not None:
        table.add_row("cost", f"${result.total_cost_usd:.4f}")
    t = result.timings
    table.add_row("timings", f"queued {_fmt_s(t.queued_s)}, sandbox {_fmt_s(t.sandbox_create_s)}, "
                  f"gateway {_fmt_s(t.gateway_ready_s)}, agent {_fmt_s(t.agent_run_s)}, "
                  f"total {_fmt_s(t.total_s)}")
    out.print(table)
    if result.result:
        out.print(Panel(Text(result.result), title="agent result", title_align="left"),
                  soft_wrap=False)
