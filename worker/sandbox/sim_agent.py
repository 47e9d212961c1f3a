"""The scripted agent inside a simulated sandbox: a stand-in for `claude -p` speaking stream-json.

It reads its command line the way the CLI does and refuses what the CLI refuses
(`stream-json` without `--verbose`, `--dangerously-skip-permissions` as root, a missing
`--mcp-config` file, no API key), so the simulated runs also test the command the adapter
builds. Its final text echoes the prompt it received, byte for byte, with a digest.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from worker.sandbox.sim import GATEWAY_NAME, argv_of, prompt_digest

if TYPE_CHECKING:
    from worker.sandbox.sim import SimCommand, SimSandbox

BUILTIN_TOOLS = ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch"]


class CliError(Exception):
    pass


class ScriptedAgent:
    def __init__(self, sandbox: SimSandbox, cmd: str, envs: dict[str, str]) -> None:
        self.sandbox = sandbox
        self.cmd = cmd
        self.envs = envs
        self.session_id = str(uuid.uuid4())

    # -- the command line -------------------------------------------------------------
    def _parse(self) -> dict[str, Any]:
        argv, stdin_path = argv_of(self.cmd)
        if not argv or not argv[0].endswith("claude"):
            raise CliError(f"bash: {argv[0] if argv else ''}: command not found")
        opts: dict[str, Any] = {"flags": set()}
        value_flags = {"--output-format", "--mcp-config", "--model", "--max-turns",
                       "--allowedTools", "--disallowedTools", "--append-system-prompt"}
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
        return opts

    def _check_flags(self, opts: dict[str, Any]) -> None:
        if "-p" not in opts["flags"]:
            raise CliError("error: this simulated CLI only runs headless (-p)")
        if opts.get("--output-format") == "stream-json" and "--verbose" not in opts["flags"]:
            raise CliError("Error: When using --print, --output-format=stream-json requires "
                           "--verbose")
        if "--dangerously-skip-permissions" in opts["flags"] and self.sandbox.user == "root":
            raise CliError("--dangerously-skip-permissions cannot be used with root/sudo "
                           "privileges for security reasons")

    def _mcp_config(self, path: str) -> dict[str, Any]:
        if path not in self.sandbox.files:
            raise CliError(f"Error: MCP config file not found: {path}")
        try:
            return dict(json.loads(self.sandbox.files[path])["mcpServers"])
        except (ValueError, KeyError, TypeError) as e:
            raise CliError(f"Error: invalid MCP config {path}: {e}") from e

    # -- the run -------------------------------------------------------------------------
    def script(self, proc: SimCommand) -> int:
        try:
            opts = self._parse()
        except CliError as e:
            proc.emit(f"{e}\n", "stderr")
            return 1
        fails = self.sandbox.fails
        latency = float(self.envs.get("SIM_LATENCY_S", self.sandbox.default_latency_s))
        n_tools = int(self.envs.get("SIM_TOOL_CALLS", "0"))
        proc.emit("[simulated] Claude Code starting (sandqueue sim provider)\n")
        mcp_tools = self._mcp_tools(opts)
        proc.emit(self._line(self._init(opts, mcp_tools)))
        if not self.envs.get("ANTHROPIC_API_KEY") or fails("agent", "auth"):
            return self._finish(proc, opts, 0, is_error=True,
                                text="Invalid API key · Please run /login")
        if fails("agent", "silent_exit"):
            return 0
        if fails("agent", "crash"):
            proc.emit('{"type":"assistant","message":{"con')
            proc.emit("TypeError: Cannot read properties of undefined (reading 'map')\n",
                      "stderr")
            return 1
        steps = n_tools + 1
        for i in range(n_tools):
            if not proc.sleep(latency / steps):
                return 137
            max_turns = opts.get("--max-turns")
            if max_turns is not None and i + 1 >= int(max_turns):
                return self._finish(proc, opts, i + 1, is_error=True, subtype="error_max_turns",
                                    text="")
            self._tool_call(proc, mcp_tools[i % len(mcp_tools)] if mcp_tools else "Bash", i)
        if fails("agent", "hang"):
            proc.sleep(float("inf"))
            return 137
        if not proc.sleep(latency / steps):
            return 137
        for what, text in (
            ("overloaded", 'API Error: 529 {"type":"error","error":{"type":"overloaded_error",'
                           '"message":"Overloaded"}}'),
            ("rate_limit", 'API Error: 429 {"type":"error","error":{"type":"rate_limit_error"}}'),
            ("is_error", "The agent could not complete the task"),
        ):
            if fails("agent", what):
                subtype = "error_during_execution" if what == "is_error" else "success"
                return self._finish(proc, opts, n_tools + 1, is_error=True, subtype=subtype,
                                    text=text + self._leak())
        return self._finish(proc, opts, n_tools + 1, is_error=False,
                            text=self._echo(opts) + self._leak())

    def _mcp_tools(self, opts: dict[str, Any]) -> list[str]:
        if GATEWAY_NAME not in (opts.get("mcp_config") or {}) or self.sandbox.fails(
            "agent", "no_tools"
        ):
            return []
        return [f"mcp__{GATEWAY_NAME}__{name.replace('/', '_')}_search"
                for name in self.sandbox.spec.mcp]

    def _init(self, opts: dict[str, Any], mcp_tools: list[str]) -> dict[str, Any]:
        servers = [
            {"name": name,
             "status": "failed" if self.sandbox.fails("agent", "mcp_failed") else "connected"}
            for name in (opts.get("mcp_config") or {})
        ]
        return {"type": "system", "subtype": "init", "session_id": self.session_id,
                "cwd": "/home/user", "model": opts.get("--model") or "claude-sonnet-4-5",
                "tools": BUILTIN_TOOLS + mcp_tools, "mcp_servers": servers,
                "permissionMode": "bypassPermissions", "simulated": True}

    def _tool_call(self, proc: SimCommand, tool: str, i: int) -> None:
        tool_id = f"toolu_sim_{i}"
        proc.emit(self._line({"type": "assistant", "session_id": self.session_id, "message": {
            "role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": tool,
                                              "input": {"query": f"step {i}"}}],
            "usage": {"input_tokens": 100, "output_tokens": 20}}}))
        proc.emit(self._line({"type": "user", "session_id": self.session_id, "message": {
            "role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                         "content": f"[simulated] result {i}"}]}}))

    def _echo(self, opts: dict[str, Any]) -> str:
        prompt: bytes = opts["prompt"]
        servers = ", ".join(self.sandbox.spec.mcp) or "none"
        header = (f"[simulated] Claude Code received {len(prompt)} bytes "
                  f"(sha256 {prompt_digest(prompt)}), model {opts.get('--model') or 'default'}, "
                  f"MCP servers: {servers}.")
        return f"{header}\n--- prompt ---\n{prompt.decode('utf-8', 'surrogatepass')}"

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

    def _finish(self, proc: SimCommand, opts: dict[str, Any], turns: int, *, is_error: bool,
                text: str, subtype: str = "success") -> int:
        if not is_error:
            proc.emit(self._line({"type": "assistant", "session_id": self.session_id,
                                  "message": {"role": "assistant",
                                              "content": [{"type": "text", "text": text}],
                                              "usage": {"input_tokens": 50,
                                                        "output_tokens": 30}}}))
        cost = float(self.envs.get("SIM_COST_USD", "0.0042"))
        proc.emit(self._line({
            "type": "result", "subtype": subtype, "is_error": is_error,
            "duration_ms": 1, "num_turns": turns, "result": text,
            "session_id": self.session_id, "total_cost_usd": cost,
            "usage": {"input_tokens": 50 + 100 * (turns - 1),
                      "output_tokens": 30 + 20 * (turns - 1)},
        }))
        return 0

    @staticmethod
    def _line(event: dict[str, Any]) -> str:
        return json.dumps(event) + "\n"
