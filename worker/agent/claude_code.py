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
from sandqueue.settings import Settings
from worker.agent.pricing import estimate_usd
from worker.agent.stream import LineBuffer, Transcript
from worker.agent.watchdog import Watch, Watchdog
from worker.sandbox.base import Sandbox, TemplateRecipe

GATEWAY_NAME = "e2b-mcp-gateway"
WORK_DIR = "/home/user"
FILES_DIR = "/home/user/.sandqueue"
PROMPT_PATH = f"{FILES_DIR}/prompt.txt"
MCP_CONFIG_PATH = f"{FILES_DIR}/mcp.json"

EventSink = Callable[[dict[str, Any]], None]

SIM_PLACEHOLDER_KEY = "sk-ant-simulated-placeholder"
"""Given to the simulated agent when no credential is configured (sim mode only)."""

_RATE = re.compile(r"\b429\b|rate.?limit|usage limit|hit your .*limit", re.I)
_OVERLOADED = re.compile(r"\b(5\d\d)\b|overloaded|internal server error|timed? ?out", re.I)
_AUTH = re.compile(
    r"invalid api key|authentication_error|\b401\b|please run /login|api key.*(missing|not set)"
    r"|invalid auth token|fix external",
    re.I,
)
_VERSION = re.compile(r"\b(\d+\.\d+\.\d+)\b")

PINNED_VERSION = "2.1.221"
"""The Claude Code version `sandqueue template build` installs by default: the first whose
`-p` mode waits for `--mcp-config` servers before the first turn (CHANGELOG 2.1.221: "Fixed
MCP servers from --mcp-config not being connected before the first turn in print mode")."""
NPM_PACKAGE = "@anthropic-ai/claude-code"
CREDENTIAL_ENVS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")
"""Either runs Claude Code headless; with both, the API key wins in `-p` mode
(code.claude.com/docs/en/authentication). The OAuth token comes from `claude setup-token`."""

MCP_TOOL_PREFIX = f"mcp__{GATEWAY_NAME}__"
NEUTRAL_MCP_PREFIX = "mcp:"
"""Tasks name gateway tools `mcp:<tool>` (`mcp:*` for all): the gateway's server name is
this adapter's business, not the task's."""

# The synthetic assistant message that carries an API error names its kind in `error`
# (code.claude.com/docs/en/headless, "Handle API retries": the `error` values).
_API_ERROR_KINDS: dict[str, type[errors.SandqueueError]] = {
    "authentication_failed": errors.AuthError,
    "oauth_org_not_allowed": errors.AuthError,
    "billing_error": errors.AuthError,
    "rate_limit": errors.RateLimited,
    "overloaded": errors.ModelUnavailable,
    "server_error": errors.ModelUnavailable,
}


def mcp_client_config(url: str, token: str) -> str:
    """The `--mcp-config` file: the gateway as one HTTP MCP server, bearer token in a header."""
    server = {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {token}"}}
    return json.dumps({"mcpServers": {GATEWAY_NAME: server}})


def tool_rule(name: str) -> str:
    """A task's tool name as a Claude Code permission rule: `mcp:search` is the gateway's
    `search` tool, `mcp:*` every gateway tool; other names (`Read`, `Bash(npm test)`,
    `mcp__...`) pass as they are."""
    if name.startswith(NEUTRAL_MCP_PREFIX):
        return MCP_TOOL_PREFIX + name[len(NEUTRAL_MCP_PREFIX):]
    return name


def permission_args(task: AgentTask) -> list[str]:
    """Flags that make a task's tool lists bind.

    Under `--dangerously-skip-permissions` (bypass mode) allow rules have no effect and only
    deny rules bind (code.claude.com/docs/en/permission-modes: "Allow rules have no effect in
    bypassPermissions"; anthropics/claude-code#12232, #50303). So a task with an allow-list
    runs in `dontAsk` mode, where a call no allow rule matches is denied, and `--tools`
    limits the built-in tool set to the allowed built-ins (closing dontAsk's read-only Bash
    exception). Deny rules (`--disallowedTools`) bind in every mode; a bare name removes the
    tool from the agent's context."""
    allowed = [tool_rule(t) for t in task.allowed_tools]
    denied = [tool_rule(t) for t in task.disallowed_tools]
    if not allowed:
        args = ["--dangerously-skip-permissions"]
    else:
        builtins = list(dict.fromkeys(
            r.split("(", 1)[0] for r in allowed if not r.startswith("mcp__")))
        args = ["--permission-mode", "dontAsk", "--allowedTools", ",".join(allowed),
                "--tools", ",".join(builtins)]
    if denied:
        args += ["--disallowedTools", ",".join(denied)]
    return args


def build_command(task: AgentTask, claude: str = "claude", with_mcp: bool = True) -> str:
    """The shell command that runs the agent; every variable part is shell-quoted."""
    args = [claude, "-p", "--output-format", "stream-json", "--verbose",
            *permission_args(task)]
    if with_mcp:
        args += ["--mcp-config", MCP_CONFIG_PATH, "--strict-mcp-config"]
    if task.model:
        args += ["--model", task.model]
    if task.max_turns:
        args += ["--max-turns", str(task.max_turns)]
    if task.append_system_prompt:
        args += ["--append-system-prompt", task.append_system_prompt]
    quoted = " ".join(shlex.quote(a) for a in args)
    return f"cd {shlex.quote(WORK_DIR)} && exec {quoted} < {shlex.quote(PROMPT_PATH)}"


def agent_version(sandbox: Sandbox, claude: str = "claude") -> str:
    """Check that the CLI runs for the sandbox user before spending a run on it; its
    version (`2.1.70 (Claude Code)` from `claude --version`) goes into the result."""
    out = sandbox.run(f"{shlex.quote(claude)} --version", timeout_s=30)
    found = _VERSION.search(out.stdout)
    if out.exit_code != 0 or found is None:
        said = (out.stderr or out.stdout).strip()[-300:] or f"exit code {out.exit_code}"
        raise errors.AgentMissing(
            f"Claude Code ({claude}) does not run for the sandbox user in this template "
            f"({said}); use a template that has it: the E2B `mcp-gateway` template, or one "
            "built with a pinned version by `sandqueue template build` (then set "
            "SANDQUEUE_TEMPLATE)")
    return found.group(1)


@dataclass
class AgentRun:
    """What one agent run produced; `transcript` is filled even when the run failed."""

    transcript: Transcript
    exit_code: int | None = None
    cost_usd: float = 0.0
    """Estimated from usage while running; the result event's figure once it arrives."""
    duration_s: float = 0.0
    stderr_tail: str = ""
    agent_version: str | None = None


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

    @staticmethod
    def credentials(settings: Settings, simulated: bool) -> dict[str, str]:
        """The sandbox variables that let Claude Code reach the model (secrets: redacted
        from everything that leaves the worker)."""
        envs = {name: value.get_secret_value() for name, value in (
            ("ANTHROPIC_API_KEY", settings.anthropic_api_key),
            ("CLAUDE_CODE_OAUTH_TOKEN", settings.claude_code_oauth_token)) if value is not None}
        if not envs and simulated:
            envs = {"ANTHROPIC_API_KEY": SIM_PLACEHOLDER_KEY}
        if envs:
            return envs
        raise errors.AuthError(
            "neither ANTHROPIC_API_KEY nor CLAUDE_CODE_OAUTH_TOKEN is set on this worker; "
            "Claude Code cannot run without one of them")

    def template_recipe(self, version: str = PINNED_VERSION,
                        base: str = "mcp-gateway") -> TemplateRecipe:
        """A template with this exact Claude Code version on the sandbox user's PATH."""
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise errors.ConfigError(f"Claude Code version {version!r} is not X.Y.Z, e.g. "
                                     f"{PINNED_VERSION}")
        return TemplateRecipe(base=base, npm_global=(f"{NPM_PACKAGE}@{version}",),
                              check_command=f"{shlex.quote(self.claude_command)} --version")

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
        run.agent_version = agent_version(sandbox, self.claude_command)
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
            if problem is not None:
                self.watch.trip(problem)
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


def _mcp_problem(transcript: Transcript) -> errors.SandqueueError | None:
    """Fail fast only on what init says for sure. Recent Claude Code connects MCP servers in
    the background and reports healthy ones `pending`, with none of their tools listed yet
    (code.claude.com/docs/en/agent-sdk/mcp: "Don't treat pending as a failure. Check for
    failed or needs-auth"; anthropics/claude-code#74926, #65094): that is not-yet-known.
    Whether the gateway works was checked by the preflight before the run, and shows in
    the tool calls the agent makes."""
    for problem in (transcript.init or {}).get("mcp_server_errors") or []:
        if isinstance(problem, dict) and problem.get("name") == GATEWAY_NAME:
            return errors.McpConfigError(
                f"Claude Code refused the MCP gateway's config: {problem.get('message')}")
    servers = {s["name"]: s["status"] for s in transcript.mcp_servers}
    status = servers.get(GATEWAY_NAME)
    if status is None:
        return errors.McpUnavailable(
            f"Claude Code did not list the MCP gateway ({GATEWAY_NAME}) at start")
    if status == "needs-auth":
        return errors.AuthError("Claude Code says the MCP gateway needs authentication: "
                                "the gateway refused its bearer token")
    if status == "failed":
        return errors.McpUnavailable("Claude Code could not connect to the MCP gateway")
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
    subtype = result.get("subtype")
    if not result.get("is_error") and subtype in (None, "success"):
        return
    kind, text = classify_result(result, run.transcript.api_error)
    how = f" ({subtype})" if subtype not in (None, "success") else ""
    raise kind(f"the agent ended with an error{how}: {text[:1000]}")


def classify_result(result: dict[str, Any],
                    api_error: str | None = None) -> tuple[type[errors.SandqueueError], str]:
    """An error result's class and text. API errors arrive as `subtype: success` with
    `is_error: true`, the HTTP status in `api_error_status` and the message in `result`;
    the error subtypes carry `errors: [...]` and no `result` (code.claude.com/docs/en/
    agent-sdk/typescript, SDKResultMessage)."""
    subtype = result.get("subtype")
    listed = [str(e) for e in result.get("errors") or [] if e]
    text = str(result.get("result") or "; ".join(listed) or subtype or "error")
    if subtype == "error_max_turns":
        return errors.MaxTurns, text
    if subtype == "error_max_budget_usd":
        return errors.BudgetExceeded, text
    status = result.get("api_error_status")
    if isinstance(status, int):
        if status in (401, 403):
            return errors.AuthError, text
        if status == 429:
            return errors.RateLimited, text
        if status >= 500:
            return errors.ModelUnavailable, text
    if api_error in _API_ERROR_KINDS:
        return _API_ERROR_KINDS[api_error], text
    return classify_failure(text), text
