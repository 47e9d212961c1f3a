"""The scripted agent inside a simulated sandbox: a stand-in for `claude -p` speaking stream-json.

It reads its command line the way the CLI does and refuses what the CLI refuses
(`stream-json` without `--verbose`, `--dangerously-skip-permissions` as root, a missing
`--mcp-config` file, no credential), so the simulated runs also test the command the adapter
builds. It reproduces what the real CLI does on healthy runs that a naive adapter misreads
(MCP servers `pending` at init, usage repeated per content block, API errors as `success`
results with `is_error`) and applies tool permissions with the real semantics (allow rules
ignored in bypass mode, denies binding in every mode, `--tools` limiting built-ins), so a
test fails where production would. Its final text echoes the prompt it received, byte for
byte, with a digest. The research behind each quirk is cited where it is reproduced.

Sessions are kept as the CLI keeps them (research/claude-code-facts.md §7): a transcript
`~/.claude/projects/<cwd, non-alphanumerics as '-'>/<session id>.jsonl` in the sandbox's
files, appended per turn; `--resume <id>` continues it under the same id (a resumed answer
says which session, which turn and the digest of the transcript it found) or, when there is
none, ends `error_during_execution` with "No conversation found with session ID: <id>",
exit 1 (§3.3); `--json-schema` puts the answer in `structured_output` after the CLI's own
check, which ignores `format` (§7), and refuses an invalid schema.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any

import jsonschema

from sandqueue import errors
from worker.sandbox.sim_shell import argv_of, cwd_of, gateway_tools, prompt_digest

if TYPE_CHECKING:
    from worker.sandbox.sim import SimCommand, SimSandbox

BUILTIN_TOOLS = ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch"]


SIM_CLAUDE_VERSION = "2.1.221"
"""The Claude Code version whose behaviour the scripted agent imitates (2.1.221: `-p` with
`--mcp-config` waits for pending servers before the first turn, up to MCP_TIMEOUT)."""
DONT_ASK_DENIAL = ("Permission to use {tool} has been denied because Claude Code is running in "
                   "don't ask mode.")
NO_SUCH_TOOL = "<tool_use_error>Error: No such tool available: {tool}</tool_use_error>"
BAD_KEY = "bad-key"
"""An ANTHROPIC_API_KEY with this value is refused as an invalid key."""
API_ERRORS: dict[str, tuple[int, str, str]] = {
    # what: (api_error_status, synthetic `error` kind, result text) as current versions print
    # them (code.claude.com/docs/en/errors)
    "overloaded": (529, "overloaded", "API Error: Repeated 529 Overloaded errors. The API is "
                   "at capacity — this is usually temporary. Try again in a moment."),
    "rate_limit": (429, "rate_limit", "API Error: Request rejected (429) · this may be a "
                   "temporary capacity issue."),
    "auth": (401, "authentication_failed", "Invalid API key · Fix external API key"),
}


NO_STRUCTURED = object()
"""The run was not asked for structured output (no `structured_output` in its result)."""
REFUSED = object()
"""The CLI's own schema check refused every answer (error_max_structured_output_retries)."""
MAX_STRUCTURED_OUTPUT_RETRIES = 5


class CliError(Exception):
    pass


def example_of(schema: Any, root: Any = None) -> Any:
    """A small instance of a schema, for runs that script no answer (SIM_OUTPUT unset)."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return example_of(target, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    samples = {"date": "2026-12-02", "date-time": "2026-12-02T10:00:00Z",
               "email": "sim@example.com", "uri": "https://example.com/"}
    return {
        "object": lambda: {k: example_of(v, root)
                           for k, v in (schema.get("properties") or {}).items()},
        "array": lambda: [],
        "string": lambda: samples.get(schema.get("format"), "simulated"),
        "integer": lambda: int(schema.get("minimum", 0)),
        "number": lambda: float(schema.get("minimum", 0)),
        "boolean": lambda: True,
    }.get(kind, lambda: None)()


def _matches(rule: str, tool: str) -> bool:
    """A permission rule's tool part against a tool name: exact, `mcp__server` (all of a
    server's tools) or a trailing `*` glob."""
    name = rule.split("(", 1)[0]
    if name.endswith("*"):
        return tool.startswith(name[:-1])
    return tool == name or (name.startswith("mcp__") and name.count("__") == 1
                            and tool.startswith(name + "__"))


class ScriptedAgent:
    def __init__(self, sandbox: SimSandbox, cmd: str, envs: dict[str, str]) -> None:
        self.sandbox = sandbox
        self.cmd = cmd
        self.envs = envs
        self.session_id = str(uuid.uuid4())
        self.turn = 1
        """Which turn of its session this run is (2 and up when resumed)."""
        self.prior = b""
        """The transcript a resumed session started from."""
        self.project_dir = ""
        self._messages = 0
        self.usage: dict[str, dict[str, int]] = {}
        self.denials: list[dict[str, Any]] = []

    # -- the command line -------------------------------------------------------------
    def _parse(self) -> dict[str, Any]:
        argv, stdin_path = argv_of(self.cmd)
        if not argv or not argv[0].endswith("claude"):
            raise CliError(f"bash: {argv[0] if argv else ''}: command not found")
        opts: dict[str, Any] = {"flags": set()}
        value_flags = {"--output-format", "--mcp-config", "--model", "--max-turns",
                       "--allowedTools", "--disallowedTools", "--append-system-prompt",
                       "--permission-mode", "--tools", "--json-schema", "--resume",
                       "--session-id"}
        it = iter(argv[1:])
        for arg in it:
            if arg in value_flags:
                opts[arg] = next(it, None)
                if opts[arg] is None:
                    raise CliError(f"error: option '{arg} <value>' argument missing")
            elif arg.startswith("-"):
                opts["flags"].add(arg)
            else:
                raise CliError(f"error: unexpected argument {arg!r} (prompt must come on stdin)")
        self._check_flags(opts)
        if stdin_path is None or stdin_path not in self.sandbox.files:
            raise CliError(f"bash: {stdin_path}: No such file or directory")
        opts["prompt"] = self.sandbox.files[stdin_path]
        config_path = opts.get("--mcp-config")
        if config_path is not None:
            opts["mcp_config"] = self._mcp_config(config_path)
        if opts.get("--json-schema") is not None:
            opts["schema"] = self._schema(opts["--json-schema"])
        opts["cwd"] = cwd_of(self.cmd) or "/home/user"
        return opts

    @staticmethod
    def _schema(text: str) -> dict[str, Any]:
        """Since 2.1.205 an invalid schema is refused, not silently ignored (CHANGELOG)."""
        try:
            schema = json.loads(text)
            if not isinstance(schema, dict):
                raise ValueError("not an object")
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except (ValueError, jsonschema.SchemaError) as e:
            raise CliError("Error: --json-schema is not a valid JSON Schema") from e
        return schema

    def _check_flags(self, opts: dict[str, Any]) -> None:
        if "-p" not in opts["flags"]:
            raise CliError("error: this simulated CLI only runs headless (-p)")
        if opts.get("--output-format") == "stream-json" and "--verbose" not in opts["flags"]:
            raise CliError("Error: When using --print, --output-format=stream-json requires "
                           "--verbose")
        mode = opts.get("--permission-mode", "default")
        if mode not in {"default", "acceptEdits", "bypassPermissions", "plan", "dontAsk",
                        "auto"}:
            raise CliError(f"error: option '--permission-mode <mode>' argument '{mode}' is "
                           "invalid")
        if "--dangerously-skip-permissions" in opts["flags"]:
            mode = "bypassPermissions"
        # The root check applies to bypass mode only (anthropics/claude-code src/setup.ts).
        if mode == "bypassPermissions" and self.sandbox.user == "root":
            raise CliError("--dangerously-skip-permissions cannot be used with root/sudo "
                           "privileges for security reasons")
        opts["mode"] = mode

    def _mcp_config(self, path: str) -> dict[str, Any]:
        if path not in self.sandbox.files:
            raise CliError(f"Error: MCP config file not found: {path}")
        try:
            return dict(json.loads(self.sandbox.files[path])["mcpServers"])
        except (ValueError, KeyError, TypeError) as e:
            raise CliError(f"Error: invalid MCP config {path}: {e}") from e

    # -- tools and permissions, as the CLI applies them ----------------------------------
    def _rules(self, opts: dict[str, Any], flag: str) -> list[str]:
        return [r.strip() for r in (opts.get(flag) or "").split(",") if r.strip()]

    def _context_tools(self, opts: dict[str, Any], mcp_tools: list[str]) -> list[str]:
        """Tools the model is given: `--tools` limits the built-ins (not MCP tools); a bare
        name in `--disallowedTools` removes a tool (code.claude.com/docs/en/cli-reference)."""
        builtins = BUILTIN_TOOLS
        if "--tools" in opts:
            wanted = set(self._rules(opts, "--tools"))
            builtins = [t for t in BUILTIN_TOOLS if t in wanted]
        bare_denies = [r for r in self._rules(opts, "--disallowedTools") if "(" not in r]
        return [t for t in builtins + mcp_tools
                if not any(_matches(r, t) for r in bare_denies)]

    def _verdict(self, opts: dict[str, Any], tool: str, context: list[str]) -> str | None:
        """None when the call runs, else the error the model gets back."""
        if tool not in context:
            return NO_SUCH_TOOL.format(tool=tool)
        if any(_matches(r, tool) for r in self._rules(opts, "--disallowedTools")):
            return f"Permission to use {tool} has been denied."
        # Allow rules have no effect in bypass mode (docs: permission-modes).
        if opts["mode"] == "dontAsk" and not any(
                _matches(r, tool) for r in self._rules(opts, "--allowedTools")):
            return DONT_ASK_DENIAL.format(tool=tool)
        return None

    # -- the run -------------------------------------------------------------------------
    def version(self) -> tuple[int, str, str]:
        """`claude --version`, or the shell's answer when the template lacks the CLI."""
        if self.sandbox.fails("agent", "missing"):
            return 127, "", "bash: line 1: claude: command not found\n"
        return 0, f"{SIM_CLAUDE_VERSION} (Claude Code)\n", ""

    def script(self, proc: SimCommand) -> int:
        if self.sandbox.fails("agent", "missing"):
            proc.emit("bash: line 1: claude: command not found\n", "stderr")
            return 127
        try:
            opts = self._parse()
        except CliError as e:
            proc.emit(f"{e}\n", "stderr")
            return 1
        proc.emit("[simulated] Claude Code starting (sandqueue sim provider)\n")
        missing = self._open_session(proc, opts)
        if missing is not None:
            return missing
        mcp_tools = self._mcp_tools(opts)
        context = self._context_tools(opts, mcp_tools)
        proc.emit(self._line(self._init(opts, mcp_tools, context)))
        self._record({"type": "user", "message": {"role": "user", "content": opts[
            "prompt"].decode("utf-8", "surrogatepass")}})
        early = self._early_exit(proc, opts)
        if early is not None:
            return early
        return self._work(proc, opts, mcp_tools, context)

    # -- sessions: transcripts, --resume, --session-id -------------------------------------
    def _config_dir(self) -> str:
        home = "/root" if self.sandbox.user == "root" else f"/home/{self.sandbox.user}"
        return self.envs.get("CLAUDE_CONFIG_DIR") or f"{home}/.claude"

    @property
    def transcript_path(self) -> str:
        return f"{self.project_dir}/{self.session_id}.jsonl"

    def _open_session(self, proc: SimCommand, opts: dict[str, Any]) -> int | None:
        """Start or resume the session; the exit code when `--resume` finds none. Version
        2.1.221 looks in the current cwd's project only (2.1.223 searches all)."""
        self.project_dir = (f"{self._config_dir()}/projects/"
                            f"{re.sub(r'[^A-Za-z0-9]', '-', opts['cwd'])}")
        resume = opts.get("--resume")
        if resume is None:
            self.session_id = opts.get("--session-id") or self.session_id
            return None
        try:
            self.prior = self.sandbox.read_file(f"{self.project_dir}/{resume}.jsonl")
        except errors.SandboxFileNotFound:
            return self._finish(proc, opts, 0, subtype="error_during_execution",
                                errors_=[f"No conversation found with session ID: {resume}"])
        self.session_id = resume
        self.turn = 1 + sum(1 for line in self.prior.splitlines()
                            if json.loads(line).get("type") == "user")
        return None

    def _record(self, event: dict[str, Any]) -> None:
        """Append a line to the session's transcript, as the CLI persists each message."""
        line = json.dumps({**event, "sessionId": self.session_id}) + "\n"
        try:
            before = self.sandbox.read_file(self.transcript_path)
        except errors.SandboxFileNotFound:
            before = b""
        self.sandbox.write_file(self.transcript_path, before + line.encode())

    def _scripted(self) -> tuple[bool, Any]:
        """(True, this turn's answer) when SIM_OUTPUT scripts one, else (False, None)."""
        raw = self.envs.get("SIM_OUTPUT")
        if raw is None:
            return False, None
        try:
            answers = json.loads(raw)
        except ValueError:
            answers = [raw]
        if not isinstance(answers, list) or not answers:
            answers = [answers]
        return True, answers[min(self.turn, len(answers)) - 1]

    def _answer(self, opts: dict[str, Any]) -> tuple[str, Any]:
        """(final text, structured output or NO_STRUCTURED or REFUSED) of this turn."""
        echo = self._echo(opts) + self._leak()
        scripted, value = self._scripted()
        schema = opts.get("schema")
        if schema is None:
            if not scripted:
                return echo, NO_STRUCTURED
            return (value if isinstance(value, str) else json.dumps(value)), NO_STRUCTURED
        value = value if scripted else example_of(schema)
        # The CLI's StructuredOutput tool checks the schema without asserting `format`.
        if not jsonschema.validators.validator_for(schema)(schema).is_valid(value):
            return echo, REFUSED
        return echo, value

    def _early_exit(self, proc: SimCommand, opts: dict[str, Any]) -> int | None:
        """Credentials and the crash modes that end a run before its first turn."""
        key = self.envs.get("ANTHROPIC_API_KEY")
        if not key and not self.envs.get("CLAUDE_CODE_OAUTH_TOKEN"):
            return self._api_error(proc, opts, None, "authentication_failed",
                                   "Not logged in · Please run /login")
        if key == BAD_KEY or self.sandbox.fails("agent", "auth"):
            return self._api_error(proc, opts, *API_ERRORS["auth"])
        if self.sandbox.fails("agent", "silent_exit"):
            return 0
        if self.sandbox.fails("agent", "crash"):
            proc.emit('{"type":"assistant","message":{"con')
            proc.emit("TypeError: Cannot read properties of undefined (reading 'map')\n",
                      "stderr")
            return 1
        return None

    def _work(self, proc: SimCommand, opts: dict[str, Any], mcp_tools: list[str],
              context: list[str]) -> int:
        fails = self.sandbox.fails
        latency = float(self.envs.get("SIM_LATENCY_S", self.sandbox.default_latency_s))
        self._edit()
        planned = self._planned_calls(mcp_tools)
        steps = len(planned) + 1
        for i, tool in enumerate(planned):
            if not proc.sleep(latency / steps):
                return 137
            max_turns = opts.get("--max-turns")
            if max_turns is not None and i + 1 >= int(max_turns):
                return self._finish(proc, opts, i + 1, subtype="error_max_turns",
                                    errors_=[f"Reached maximum number of turns ({max_turns})"])
            self._tool_call(proc, opts, tool, context, i)
        if fails("agent", "hang"):
            proc.sleep(float("inf"))
            return 137
        if not proc.sleep(latency / steps):
            return 137
        for what in ("overloaded", "rate_limit"):
            if fails("agent", what):
                status, kind, text = API_ERRORS[what]
                return self._api_error(proc, opts, status, kind, text + self._leak())
        if fails("agent", "is_error"):
            return self._finish(proc, opts, steps, subtype="error_during_execution",
                                errors_=["The agent could not complete the task"
                                         + self._leak()])
        answer, structured = self._answer(opts)
        if structured is REFUSED:
            return self._finish(proc, opts, steps + MAX_STRUCTURED_OUTPUT_RETRIES,
                                subtype="error_max_structured_output_retries", errors_=[
                                    "Failed to provide valid structured output after "
                                    f"{MAX_STRUCTURED_OUTPUT_RETRIES} attempts"])
        self._assistant(proc, opts, [{"type": "text", "text": answer}],
                        input_tokens=50, output_tokens=30)
        self._record({"type": "assistant", "message": {"role": "assistant", "content": [
            {"type": "text", "text": answer}]}})
        return self._finish(proc, opts, steps, text=answer, structured=structured)

    def _edit(self) -> None:
        """SIM_EDITS={"path": "new content", "gone.txt": null}: the files the agent writes
        (or deletes), relative to its working directory, at once: a test that times the
        agent out still finds them there to collect."""
        edits = json.loads(self.envs.get("SIM_EDITS") or "{}")
        base = cwd_of(self.cmd) or "/home/user"
        for path, content in edits.items():
            target = f"{base}/{path}"
            if content is None:
                self.sandbox.disk.delete(target)
            else:
                self.sandbox.disk.write(target, content.encode())

    def _leak(self) -> str:
        """What SIM_ECHO asks the agent to repeat: sandbox env values and MCP settings."""
        said = []
        for item in filter(None, (p.strip() for p in self.envs.get("SIM_ECHO", "").split(","))):
            if item.startswith("mcp:"):
                server, _, key = item[4:].rpartition(".")
                value = (self.sandbox.spec.mcp.get(server) or {}).get(key)
            else:
                value = self.envs.get(item)
            said.append(f"\n{item} is {value}")
        return "".join(said)

    def _planned_calls(self, mcp_tools: list[str]) -> list[str]:
        """The tool calls the scripted model attempts: SIM_TOOLS names them (in order,
        cycled), else the gateway's tools, else Bash; SIM_TOOL_CALLS says how many."""
        n = int(self.envs.get("SIM_TOOL_CALLS", "0"))
        named = [t.strip() for t in self.envs.get("SIM_TOOLS", "").split(",") if t.strip()]
        pool = named or mcp_tools or ["Bash"]
        return [pool[i % len(pool)] for i in range(n or (len(named) if named else 0))]

    def _mcp_tools(self, opts: dict[str, Any]) -> list[str]:
        # As the CLI names them: `mcp__<server as configured>__<tool the server lists>`;
        # the only server configured is the sandbox's gateway, under whatever name.
        return [f"mcp__{server}__{tool}" for server in opts.get("mcp_config") or {}
                for tool in gateway_tools(self.sandbox.spec.mcp)]

    def _mcp_status(self) -> str:
        if self.sandbox.fails("agent", "mcp_failed"):
            return "failed"
        return self.envs.get("SIM_MCP_STATUS", "connected")

    def _init(self, opts: dict[str, Any], mcp_tools: list[str],
              context: list[str]) -> dict[str, Any]:
        status = self._mcp_status()
        servers = [{"name": name, "status": status} for name in (opts.get("mcp_config") or {})]
        # A server still connecting has none of its tools listed yet (anthropics/claude-code
        # #74926); they appear when it connects.
        listed = context if status == "connected" else [t for t in context
                                                         if t not in mcp_tools]
        key_source = "ANTHROPIC_API_KEY" if self.envs.get("ANTHROPIC_API_KEY") else "none"
        return {"type": "system", "subtype": "init", "session_id": self.session_id,
                "cwd": opts["cwd"], "model": opts.get("--model") or "claude-sonnet-4-5",
                "tools": listed, "mcp_servers": servers, "permissionMode": opts["mode"],
                "apiKeySource": key_source, "claude_code_version": SIM_CLAUDE_VERSION,
                "output_style": "default", "uuid": str(uuid.uuid4()), "simulated": True}

    def _assistant(self, proc: SimCommand, opts: dict[str, Any], blocks: list[dict[str, Any]],
                   *, input_tokens: int, output_tokens: int) -> None:
        """One model response: one `assistant` line per content block, all with the same
        message id and usage, `output_tokens` a placeholder until the last copy
        (code.claude.com/docs/en/agent-sdk/cost-tracking; anthropics/claude-code#87303)."""
        self._messages += 1
        message_id = f"msg_sim_{self.session_id[:8]}_{self._messages}"
        final = {"input_tokens": input_tokens, "cache_read_input_tokens": 1000,
                 "output_tokens": output_tokens}
        self.usage[message_id] = final
        for n, block in enumerate(blocks):
            usage = final if n == len(blocks) - 1 else {**final, "output_tokens": 1}
            proc.emit(self._line({"type": "assistant", "session_id": self.session_id,
                                  "parent_tool_use_id": None, "message": {
                                      "id": message_id, "type": "message", "role": "assistant",
                                      "model": opts.get("--model") or "claude-sonnet-4-5",
                                      "content": [block], "stop_reason": None,
                                      "usage": usage}}))

    def _tool_call(self, proc: SimCommand, opts: dict[str, Any], tool: str,
                   context: list[str], i: int) -> None:
        tool_id = f"toolu_sim_{i}"
        self._assistant(proc, opts, [
            {"type": "text", "text": f"Step {i}: let me use {tool}."},
            {"type": "tool_use", "id": tool_id, "name": tool, "input": {"query": f"step {i}"}},
        ], input_tokens=100, output_tokens=20)
        refused = self._verdict(opts, tool, context)
        if refused is None:
            self.sandbox.executed_tools.append(tool)
            content, is_error = f"[simulated] result {i}", False
        else:
            self.denials.append({"tool_name": tool, "tool_use_id": tool_id,
                                 "tool_input": {"query": f"step {i}"}})
            content, is_error = refused, True
        proc.emit(self._line({"type": "user", "session_id": self.session_id, "message": {
            "role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                         "content": content, "is_error": is_error}]}}))

    def _echo(self, opts: dict[str, Any]) -> str:
        prompt: bytes = opts["prompt"]
        servers = ", ".join(self.sandbox.spec.mcp) or "none"
        header = (f"[simulated] Claude Code received {len(prompt)} bytes "
                  f"(sha256 {prompt_digest(prompt)}), model {opts.get('--model') or 'default'}, "
                  f"MCP servers: {servers}.")
        if self.turn > 1:
            header += (f"\n[simulated] resumed session {self.session_id}, turn {self.turn}, "
                       f"from a transcript of {len(self.prior)} bytes "
                       f"(sha256 {prompt_digest(self.prior)}).")
        return f"{header}\n--- prompt ---\n{prompt.decode('utf-8', 'surrogatepass')}"

    def _api_error(self, proc: SimCommand, opts: dict[str, Any], status: int | None,
                   kind: str, text: str) -> int:
        """How an API error ends a run: a `<synthetic>` assistant message naming the error
        kind, then a `success` result with `is_error` and the HTTP status."""
        proc.emit(self._line({"type": "assistant", "session_id": self.session_id,
                              "error": kind, "message": {
                                  "id": f"msg_synthetic_{uuid.uuid4().hex[:8]}",
                                  "model": "<synthetic>", "role": "assistant",
                                  "content": [{"type": "text", "text": text}]}}))
        return self._finish(proc, opts, 1, text=text, is_error=True, api_error_status=status)

    def _finish(self, proc: SimCommand, opts: dict[str, Any], turns: int, *,
                subtype: str = "success", text: str | None = None, is_error: bool = False,
                errors_: list[str] | None = None, api_error_status: int | None = None,
                structured: Any = NO_STRUCTURED) -> int:
        """The result event: totals over unique messages, exit 1 exactly when `is_error`
        (anthropics/claude-code src/cli/print.ts)."""
        is_error = is_error or subtype != "success"
        usage: dict[str, int] = {}
        for counts in self.usage.values():
            for k, v in counts.items():
                usage[k] = usage.get(k, 0) + v
        event: dict[str, Any] = {
            "type": "result", "subtype": subtype, "is_error": is_error,
            "api_error_status": api_error_status, "duration_ms": 1, "num_turns": turns,
            "session_id": self.session_id,
            "total_cost_usd": float(self.envs.get("SIM_COST_USD", "0.0042")),
            "usage": usage, "permission_denials": self.denials,
        }
        if subtype == "success":
            event["result"] = text or ""
            if structured is not NO_STRUCTURED:
                event["structured_output"] = structured
        else:
            event["errors"] = errors_ or []
        proc.emit(self._line(event))
        return 1 if is_error else 0

    @staticmethod
    def _line(event: dict[str, Any]) -> str:
        return json.dumps(event) + "\n"
