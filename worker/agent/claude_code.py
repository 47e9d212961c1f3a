"""Claude Code, run headless in a sandbox and connected to the sandbox's MCP gateway.

The prompt and the MCP client config are written as files and the command line is built
with `shlex.quote` from the task's validated fields, so no user text is ever interpreted by
a shell (the seed's `echo '...' | claude` breaks on quotes and runs `$(...)`). The run is
parsed as it streams; the known ways a headless run goes wrong are named, not reported as
success: MCP gateway not connected, tools never registered, no result event, a stall, an
error result.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandqueue import errors
from sandqueue.contract import AgentTask
from worker.agent.pricing import estimate_usd
from worker.agent.stream import LineBuffer, Transcript
from worker.agent.watchdog import Watch, Watchdog
from worker.sandbox.base import Sandbox

GATEWAY_NAME = "e2b-mcp-gateway"
WORK_DIR = "/home/user"
FILES_DIR = "/home/user/.sandqueue"
PROMPT_PATH = f"{FILES_DIR}/prompt.txt"
MCP_CONFIG_PATH = f"{FILES_DIR}/mcp.json"

EventSink = Callable[[dict[str, Any]], None]

_RATE = re.compile(r"\b429\b|rate.?limit|usage limit", re.I)
_OVERLOADED = re.compile(r"\b(5\d\d)\b|overloaded|internal server error|timed? ?out", re.I)
_AUTH = re.compile(
    r"invalid api key|authentication_error|\b401\b|please run /login|api key.*(missing|not set)",
    re.I,
)


def mcp_client_config(url: str, token: str) -> str:
    """The `--mcp-config` file: the gateway as one HTTP MCP server, bearer token in a header."""
    server = {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {token}"}}
    return json.dumps({"mcpServers": {GATEWAY_NAME: server}})


def build_command(task: AgentTask, claude: str = "claude", with_mcp: bool = True) -> str:
    """The shell command that runs the agent; every variable part is shell-quoted."""
    args = [claude, "-p", "--output-format", "stream-json", "--verbose",
            "--dangerously-skip-permissions"]
    if with_mcp:
        args += ["--mcp-config", MCP_CONFIG_PATH, "--strict-mcp-config"]
    if task.model:
        args += ["--model", task.model]
    if task.max_turns:
        args += ["--max-turns", str(task.max_turns)]
    if task.allowed_tools:
        args += ["--allowedTools", ",".join(task.allowed_tools)]
    if task.disallowed_tools:
        args += ["--disallowedTools", ",".join(task.disallowed_tools)]
    if task.append_system_prompt:
        args += ["--append-system-prompt", task.append_system_prompt]
    quoted = " ".join(shlex.quote(a) for a in args)
    return f"cd {shlex.quote(WORK_DIR)} && exec {quoted} < {shlex.quote(PROMPT_PATH)}"


@dataclass
class AgentRun:
    """What one agent run produced; `transcript` is filled even when the run failed."""

    transcript: Transcript
    exit_code: int | None = None
    cost_usd: float = 0.0
    """Estimated from usage while running; the result event's figure once it arrives."""
    duration_s: float = 0.0
    stderr_tail: str = ""


def classify_failure(text: str) -> type[errors.SandqueueError]:
    """Which error an error result or a CLI's dying words describe."""
    if _AUTH.search(text):
        return errors.AuthError
    if _RATE.search(text):
        return errors.RateLimited
    if _OVERLOADED.search(text):
        return errors.ModelUnavailable
    return errors.AgentError


class ClaudeCodeAgent:
    def __init__(self, watchdog: Watchdog, *, stall_timeout_s: float,
                 claude_command: str = "claude") -> None:
        self.watchdog = watchdog
        self.stall_timeout_s = stall_timeout_s
        self.claude_command = claude_command

    def prepare(self, sandbox: Sandbox, task: AgentTask, with_mcp: bool) -> None:
        sandbox.write_file(PROMPT_PATH, task.prompt.encode("utf-8", "surrogatepass"))
        if with_mcp:
            sandbox.write_file(MCP_CONFIG_PATH,
                               mcp_client_config(sandbox.mcp_url(), sandbox.mcp_token()))

    def run(
        self,
        sandbox: Sandbox,
        task: AgentTask,
        *,
        deadline_at: float,
        run: AgentRun,
        with_mcp: bool = True,
        on_event: EventSink | None = None,
        interrupted: Callable[[], errors.SandqueueError | None] | None = None,
    ) -> AgentRun:
        """Run the agent to its result event, or raise the error that describes the failure.

        `run` is filled in as the stream arrives so the caller keeps partial progress
        (tool calls made, last text) whatever this raises.
        """
        self.prepare(sandbox, task, with_mcp)
        holder: dict[str, Any] = {}
        watch = Watch(stall_timeout_s=self.stall_timeout_s, deadline_at=deadline_at,
                      kill=lambda: holder["cmd"].kill() if "cmd" in holder else None,
                      interrupted=interrupted)
        stream = _StreamSink(run, task, watch, with_mcp, on_event)
        started = time.monotonic()
        remaining = max(1.0, deadline_at - time.time())
        cmd = build_command(task, self.claude_command, with_mcp)
        holder["cmd"] = sandbox.start(cmd, on_stdout=stream.on_stdout,
                                      on_stderr=stream.on_stderr, timeout_s=remaining + 5)
        self.watchdog.watch(watch)
        try:
            run.exit_code = holder["cmd"].wait()
        except errors.SandqueueError as e:
            # A stream that breaks while being stopped reports the stop, not the break.
            if watch.reason is not None:
                raise watch.reason from e
            raise
        finally:
            self.watchdog.unwatch(watch)
            run.duration_s = time.monotonic() - started
            stream.close()
        if watch.reason is not None:
            raise watch.reason
        _judge(run)
        return run



class _StreamSink:
    """Receives the agent's output chunks and acts on what they say, as they arrive."""

    def __init__(self, run: AgentRun, task: AgentTask, watch: Watch, with_mcp: bool,
                 on_event: EventSink | None) -> None:
        self.run = run
        self.task = task
        self.watch = watch
        self.with_mcp = with_mcp
        self.on_event = on_event
        self.lines = LineBuffer()
        self.stderr_tail: deque[str] = deque(maxlen=50)

    def on_stdout(self, chunk: str) -> None:
        self.watch.touch()
        for line in self.lines.feed(chunk):
            self._line(line)

    def on_stderr(self, chunk: str) -> None:
        self.watch.touch()
        self.stderr_tail.append(chunk)

    def close(self) -> None:
        for line in self.lines.close():
            self._line(line)
        self.run.stderr_tail = "".join(self.stderr_tail)[-4000:]
        final_cost = (self.run.transcript.result or {}).get("total_cost_usd")
        if isinstance(final_cost, int | float):
            self.run.cost_usd = float(final_cost)

    def _line(self, line: str) -> None:
        transcript = self.run.transcript
        event = transcript.feed_line(line)
        if event is None:
            return
        if event.get("type") == "assistant":
            self._count_cost()
        if self.with_mcp and event.get("type") == "system" and event.get("subtype") == "init":
            problem = _mcp_problem(transcript)
            if problem:
                self.watch.trip(errors.McpUnavailable(problem))
        if self.on_event is not None:
            self.on_event(event)

    def _count_cost(self) -> None:
        transcript = self.run.transcript
        self.run.cost_usd = estimate_usd((transcript.init or {}).get("model"),
                                         transcript.usage_so_far)
        cap = self.task.max_cost_usd
        if cap is not None and self.run.cost_usd >= cap:
            self.watch.trip(errors.BudgetExceeded(
                f"the agent was stopped at an estimated ${self.run.cost_usd:.4f}, over the "
                f"task's max_cost_usd (${cap:g})"
            ))


def _mcp_problem(transcript: Transcript) -> str | None:
    servers = {s["name"]: s["status"] for s in transcript.mcp_servers}
    status = servers.get(GATEWAY_NAME)
    if status is None:
        return f"Claude Code did not list the MCP gateway ({GATEWAY_NAME}) at start"
    if status != "connected":
        return f"the MCP gateway is {status!r} in Claude Code, not connected"
    prefix = f"mcp__{GATEWAY_NAME}__"
    if not any(tool.startswith(prefix) for tool in transcript.tools):
        return "the MCP gateway connected but none of its tools registered"
    return None


def _judge(run: AgentRun) -> None:
    result = run.transcript.result
    if result is None:
        said = run.stderr_tail.strip()[-500:] or "nothing on stderr"
        kind = classify_failure(said) if run.stderr_tail.strip() else errors.AgentNoResult
        if kind is errors.AgentError:
            kind = errors.AgentNoResult
        raise kind(
            f"Claude Code exited with code {run.exit_code} without a result event ({said})"
        )
    if result.get("is_error") or result.get("subtype") not in (None, "success"):
        text = str(result.get("result") or result.get("subtype") or "error")
        kind = classify_failure(text)
        if result.get("subtype") == "error_max_turns":
            kind = errors.AgentError
        subtype = result.get("subtype")
        how = f" ({subtype})" if subtype not in (None, "success") else ""
        raise kind(f"the agent ended with an error{how}: {text[:1000]}")
