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
from typing import Any, ClassVar

from sandqueue import errors
from sandqueue.contract import AgentTask
from sandqueue.settings import Settings
from worker.agent.base import (
    Agent,
    AgentEvent,
    AgentRun,
    AgentStream,
    AgentText,
    ToolCall,
    Turn,
    Usage,
)
from worker.agent.pricing import estimate_usd
from worker.agent.stream import Transcript
from worker.sandbox.base import Sandbox, TemplateRecipe
from worker.workspace import workdir

GATEWAY_NAME = "e2b-mcp-gateway"
WORK_DIR = "/home/user"
FILES_DIR = "/home/user/.sandqueue"
PROMPT_PATH = f"{FILES_DIR}/prompt.txt"
MCP_CONFIG_PATH = f"{FILES_DIR}/mcp.json"

MAX_COMMAND_BYTES = 32 * 4096
"""Linux's MAX_ARG_STRLEN (its NUL included): envd runs a command as `/bin/bash -l -c <cmd>`
(e2b/sandbox_sync/commands/command.py), so the whole command is one exec argument, and a
longer one fails with E2BIG (envd: INVALID_ARGUMENT quoting the whole command)."""

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
JSON_SCHEMA_SINCE = (2, 1, 205)
"""The first version whose `--json-schema` we hand the task's schema to. The flag predates it
(CHANGELOG 2.1.22: "Fixed structured outputs for non-interactive (-p) mode"), but before
2.1.187 follow-up turns did not reliably return structured output ("follow-up turns now
reliably return structured output"), which the repair turn needs, and before 2.1.205 an
invalid schema was silently ignored and schemas using `format` were rejected ("Fixed
`--json-schema` silently producing unstructured output when the schema was invalid, and
schemas using the `format` keyword being rejected"). Older or unknown versions (one without
the flag would refuse it and end without a result) get the runner's system-prompt
instruction instead. Sources: research/claude-code-facts.md §7 (D headless.md,
cli-reference.md; CL = anthropics/claude-code CHANGELOG.md @ 5cfc0a19)."""
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


def build_command(task: AgentTask, claude: str = "claude", with_mcp: bool = True,
                  turn: Turn | None = None) -> str:
    """The shell command that runs the agent; every variable part is shell-quoted."""
    args = [claude, "-p", "--output-format", "stream-json", "--verbose",
            *permission_args(task), *turn_args(turn or Turn())]
    if with_mcp:
        args += ["--mcp-config", MCP_CONFIG_PATH, "--strict-mcp-config"]
    if task.model:
        args += ["--model", task.model]
    if task.max_turns:
        args += ["--max-turns", str(task.max_turns)]
    if task.append_system_prompt:
        args += ["--append-system-prompt", task.append_system_prompt]
    quoted = " ".join(shlex.quote(a) for a in args)
    # where a continued session ran (Turn.cwd), else where the workspace puts the agent
    # (in the task's repo, if any)
    cwd = (turn.cwd if turn is not None else None) or workdir(task)
    command = f"cd {shlex.quote(cwd)} && exec {quoted} < {shlex.quote(PROMPT_PATH)}"
    size = len(command.encode("utf-8", "surrogatepass"))
    if size >= MAX_COMMAND_BYTES:
        raise errors.InvalidTask(
            f"the agent's command line would be {size} bytes, over the {MAX_COMMAND_BYTES}-"
            "byte limit of one exec argument (the sandbox runs it as `bash -c`); shorten "
            "append_system_prompt, output_schema or the tool lists (quoting a ' takes 5 "
            "bytes)")
    return command


def turn_args(turn: Turn) -> list[str]:
    """`--resume <id>` continues a session and keeps its id (the result's `session_id` is
    the same); `--json-schema '<schema>'` puts the parsed answer in the result's
    `structured_output` (research/claude-code-facts.md §7: D headless.md, cli-reference.md)."""
    args: list[str] = []
    if turn.resume_session_id:
        args += ["--resume", turn.resume_session_id]
    if turn.output_schema is not None:
        args += ["--json-schema", json.dumps(turn.output_schema, separators=(",", ":"),
                                             ensure_ascii=False)]
    return args


def project_dir_name(cwd: str) -> str:
    """The folder under `~/.claude/projects/` that keeps a cwd's sessions: the absolute cwd
    with every non-alphanumeric character replaced by `-` (`/home/user` -> `-home-user`).
    Names over 200 characters are truncated and hashed by the CLI; refused here instead
    (research/claude-code-facts.md §7: D sessions.md, claude-directory.md)."""
    name = re.sub(r"[^A-Za-z0-9]", "-", cwd)
    if len(name) > 200:
        raise errors.ConfigError(f"working directory {cwd!r} is too long for a session "
                                 "folder name (over 200 characters)")
    return name


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    found = _VERSION.search(version or "")
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


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


def classify_failure(text: str) -> type[errors.SandqueueError]:
    """Which error an error result or a CLI's dying words describe."""
    if _AUTH.search(text):
        return errors.AuthError
    if _RATE.search(text):
        return errors.RateLimited
    if _OVERLOADED.search(text):
        return errors.ModelUnavailable
    return errors.AgentError


class ClaudeCodeAgent(Agent):
    """Claude Code headless (`claude -p --output-format stream-json`), connected to the
    sandbox's MCP gateway through a `--mcp-config` file."""

    name: ClassVar[str] = "claude-code"

    resumable: ClassVar[bool] = True

    def __init__(self, claude_command: str = "claude", sandbox_user: str = "user") -> None:
        self.claude_command = claude_command
        self.home = "/root" if sandbox_user == "root" else f"/home/{sandbox_user}"
        """The sandbox user's HOME, where Claude Code keeps `.claude/`."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ClaudeCodeAgent:
        return cls(claude_command=settings.claude_command,
                   sandbox_user=settings.sandbox_user)

    def environment(self, settings: Settings, simulated: bool) -> dict[str, str]:
        """ANTHROPIC_API_KEY and/or CLAUDE_CODE_OAUTH_TOKEN, and no self-update mid-task."""
        envs = {name: value.get_secret_value() for name, value in (
            ("ANTHROPIC_API_KEY", settings.anthropic_api_key),
            ("CLAUDE_CODE_OAUTH_TOKEN", settings.claude_code_oauth_token)) if value is not None}
        if not envs and simulated:
            envs = {"ANTHROPIC_API_KEY": SIM_PLACEHOLDER_KEY}
        if not envs:
            raise errors.AuthError(
                "neither ANTHROPIC_API_KEY nor CLAUDE_CODE_OAUTH_TOKEN is set on this worker; "
                "Claude Code cannot run without one of them")
        return envs

    def check(self, sandbox: Sandbox) -> str:
        return agent_version(sandbox, self.claude_command)

    def prepare(self, sandbox: Sandbox, task: AgentTask, with_mcp: bool,
                turn: Turn | None = None) -> str:
        sandbox.write_file(PROMPT_PATH, task.prompt.encode("utf-8", "surrogatepass"))
        if with_mcp:
            sandbox.write_file(MCP_CONFIG_PATH,
                               mcp_client_config(sandbox.mcp_url(), sandbox.mcp_token()))
        return build_command(task, self.claude_command, with_mcp, turn)

    def native_output_schema(self, version: str | None) -> bool:
        found = version_tuple(version)
        return found is not None and found >= JSON_SCHEMA_SINCE

    def session_transcript(self, session_id: str, cwd: str | None) -> str | None:
        """`~/.claude/projects/<encoded cwd>/<session id>.jsonl` (D sessions.md). Restored
        at the same encoded cwd: before 2.1.223 `--resume <id>` looked only in the current
        cwd's project (research/claude-code-facts.md §7, "Resume across hosts"), and every
        run starts in WORK_DIR."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", session_id):
            raise errors.AgentError(f"session id {session_id[:80]!r} is not one Claude Code "
                                    "gives out")
        project = project_dir_name(cwd or WORK_DIR)
        return f"{self.home}/.claude/projects/{project}/{session_id}.jsonl"

    def stream(self, task: AgentTask, with_mcp: bool, run: AgentRun) -> AgentStream:
        return ClaudeStream(run, with_mcp)

    def price(self, model: str | None, usage: dict[str, int]) -> float:
        return estimate_usd(model, usage)

    def template_recipe(self, version: str | None = None,
                        base: str = "mcp-gateway") -> TemplateRecipe:
        """A template with this exact Claude Code version on the sandbox user's PATH."""
        version = version or PINNED_VERSION
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise errors.ConfigError(f"Claude Code version {version!r} is not X.Y.Z, e.g. "
                                     f"{PINNED_VERSION}")
        return TemplateRecipe(base=base, npm_global=(f"{NPM_PACKAGE}@{version}",),
                              check_command=f"{shlex.quote(self.claude_command)} --version")


class ClaudeStream(AgentStream):
    """Claude Code's stream-json, folded into the neutral run record as it arrives."""

    def __init__(self, run: AgentRun, with_mcp: bool) -> None:
        super().__init__(run)
        self.with_mcp = with_mcp
        self.transcript = Transcript()

    def feed(self, line: str) -> list[AgentEvent]:
        event = self.transcript.feed_line(line)
        if event is None:
            return []
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            return self._init(event)
        if kind == "assistant":
            return self._assistant(event.get("message") or {})
        if kind == "result":
            self._result(event)
        return []

    def _init(self, event: dict[str, Any]) -> list[AgentEvent]:
        run = self.run
        run.mcp_servers = self.transcript.mcp_servers
        run.session_id = run.session_id or _str(event.get("session_id"))
        run.model = _str(event.get("model"))
        run.agent_version = run.agent_version or _str(event.get("claude_code_version"))
        run.cwd = _str(event.get("cwd")) or run.cwd
        if self.with_mcp:
            problem = _mcp_problem(self.transcript)
            if problem is not None:
                raise problem
        return []

    def _assistant(self, message: dict[str, Any]) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                events.append(ToolCall(str(block.get("name", "?")), _str(block.get("id"))))
            elif block.get("type") == "text" and isinstance(block.get("text"), str):
                events.append(AgentText(block["text"]))
        self.run.tool_calls = self.transcript.tool_calls
        self.run.last_text = self.transcript.last_text
        if isinstance(message.get("usage"), dict) and self.transcript.usage_by_message:
            message_id = next(reversed(self.transcript.usage_by_message))
            events.append(Usage(message_id, self.transcript.usage_by_message[message_id]))
        return events

    def _result(self, event: dict[str, Any]) -> None:
        run = self.run
        run.is_error = event.get("is_error")
        run.subtype = _str(event.get("subtype"))
        run.num_turns = event.get("num_turns") if isinstance(event.get("num_turns"), int) else None
        run.session_id = _str(event.get("session_id")) or run.session_id
        if isinstance(event.get("result"), str):
            run.final_text = event["result"]
        if "structured_output" in event:  # with --json-schema (D headless.md)
            run.structured_output = event["structured_output"]
            run.has_structured_output = True
        if isinstance(event.get("usage"), dict):
            run.reported_usage = {k: v for k, v in event["usage"].items()
                                  if isinstance(v, int) and not isinstance(v, bool)}
        if isinstance(event.get("total_cost_usd"), int | float):
            run.reported_cost_usd = float(event["total_cost_usd"])

    def verdict(self) -> errors.SandqueueError | None:
        return _judge(self.run, self.transcript)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


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


def _judge(run: AgentRun, transcript: Transcript) -> errors.SandqueueError | None:
    result = transcript.result
    if result is None:
        said = run.stderr_tail.strip()[-500:] or "nothing on stderr"
        kind = classify_failure(said) if run.stderr_tail.strip() else errors.AgentNoResult
        if kind is errors.AgentError:
            kind = errors.AgentNoResult
        return kind(
            f"Claude Code exited with code {run.exit_code} without a result event ({said})"
        )
    subtype = result.get("subtype")
    if not result.get("is_error") and subtype in (None, "success"):
        return None
    kind, text = classify_result(result, transcript.api_error)
    how = f" ({subtype})" if subtype not in (None, "success") else ""
    return kind(f"the agent ended with an error{how}: {text[:1000]}")


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
    if subtype == "error_max_structured_output_retries":
        # The CLI retried its own schema check (MAX_STRUCTURED_OUTPUT_RETRIES, default 5;
        # research/claude-code-facts.md §3.1): our one repair turn would not do better.
        return errors.OutputInvalid, text
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
