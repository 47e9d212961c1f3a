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
        # One line however narrow the terminal: wrapped by rich, it read as two banners.
        err.print(f"[bold yellow]{SIM_BANNER}[/]", soft_wrap=True)
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
    if result.artifacts:  # issue 12
        table.add_row("artifacts", escape(", ".join(
            a.name + (" (truncated)" if a.truncated else "") for a in result.artifacts))
            + f"  [dim](sandqueue artifacts {result.task_id} --out DIR)[/]")
    _session_rows(table, result)
    t = result.timings
    table.add_row("timings", f"queued {_fmt_s(t.queued_s)}, sandbox {_fmt_s(t.sandbox_create_s)}, "
                  f"gateway {_fmt_s(t.gateway_ready_s)}, agent {_fmt_s(t.agent_run_s)}, "
                  f"total {_fmt_s(t.total_s)}")
    out.print(table)
    if result.output is not None:  # typed answers (issue 12)
        out.print(Panel(Text(json.dumps(result.output, indent=2, ensure_ascii=False)),
                        title="output (valid under output_schema)", title_align="left"),
                  soft_wrap=False)
    elif result.result:
        out.print(Panel(Text(result.result), title="agent result", title_align="left"),
                  soft_wrap=False)


def _session_rows(table: Table, result: AgentResult) -> None:
    """Follow-up turns and typed answers (issue 12): which session, continuing what."""
    if result.parent_id:
        table.add_row("continues", escape(result.parent_id))
    if result.session_id:
        table.add_row("session", escape(result.session_id))
    if result.agent_turns > 1:
        table.add_row("repair", "the answer was repaired in a second turn")


class BatchProgress:
    """A live progress bar for batches: done / failed / running / queued, cost, rate, ETA.

    On a terminal a bar; otherwise a line every 10 s; with `enabled=False` (`--no-progress`)
    nothing at all."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.shown = enabled
        self.enabled = enabled and err.is_terminal
        self._bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                             TextColumn("eta"), TimeRemainingColumn(), console=err,
                             transient=False)
        self._task = self._bar.add_task("batch", total=total, detail="")
        self._last_line = 0.0

    def __enter__(self) -> BatchProgress:
        if self.enabled:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()

    def resume_from(self, finished: int) -> None:
        """Start the bar at what earlier runs finished, so its speed and ETA count only
        this run's work (an update from 0 would count them as done in the first second)."""
        self._bar.reset(self._task, completed=finished)

    def update(self, p: Any) -> None:
        unknown = f" [yellow]{p.unknown} unknown[/]" if p.unknown else ""
        detail = (f"[green]{p.done} ok[/] [red]{p.failed} failed[/] {p.running} running "
                  f"{p.queued} queued{unknown} ${p.cost_usd:.4f} "
                  f"{p.rate(time.monotonic()):.1f}/s")
        if self.enabled:
            self._bar.update(self._task, completed=p.finished, detail=detail)
        elif self.shown and time.monotonic() - self._last_line > 10:  # a line, not a bar
            self._last_line = time.monotonic()
            err.print(f"{p.finished}/{p.total} " + detail, markup=True)


def print_batch_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"batch {summary['batch_id']}", show_header=True)
    table.add_column("status")
    table.add_column("count", justify="right")
    for status, n in sorted(summary["by_status"].items()):
        table.add_row(status, str(n))
    if summary.get("unsubmitted"):
        table.add_row("not submitted", str(summary["unsubmitted"]))
    out.print(table)
    if summary["by_error"]:
        errs = Table(title="errors by category")
        errs.add_column("category")
        errs.add_column("count", justify="right")
        for category, n in sorted(summary["by_error"].items(), key=lambda kv: -kv[1]):
            errs.add_row(category, str(n))
        out.print(errs)
    out.print(f"total {summary['total']}  cost ${summary['cost_usd']:.4f}  "
              f"duration p50 {summary['duration_p50_s']}s p95 {summary['duration_p95_s']}s  "
              f"elapsed {summary['elapsed_s']}s")
    if summary.get("stopped"):
        out.print(f"[bold yellow]stopped early:[/] {escape(summary['stopped'])}")
    if summary.get("out"):
        out.print(f"results: {summary['out']}")
