"""A simulated sandbox provider: the whole system runs without cloud accounts.

It implements the same interface as the E2B provider and imitates its semantics: output
arrives in chunks that split lines, `wait` returns exit codes, kill stops a running
command. The scripted agent inside speaks Claude Code's stream-json protocol: it checks the
command line the adapter built (as the CLI would), reads the prompt file, reports the MCP
gateway it was configured with and echoes what it received. Every result it produces is
marked simulated.

Behaviour is set per task through the task's `envs` (they become the sandbox's environment):

    SIM_LATENCY_S=2           how long the agent runs (default SANDQUEUE_SIM_LATENCY_S)
    SIM_CREATE_LATENCY_S=0.5  how long sandbox creation takes
    SIM_TOOL_CALLS=3          tool calls the agent makes before answering
    SIM_COST_USD=0.01         the cost the result reports
    SIM_ECHO=NAME,mcp:S.KEY   the agent also says the value of sandbox env NAME and of MCP
                              setting KEY of server S, as an agent that leaks a token would
                              (tests of redaction)
    SIM_FAIL=where:what[:n],...  fail the first n attempts (all when n is omitted):
        create:rate_limit|unavailable|auth|gateway_config|template
        gateway:timeout|unauthorized|no_tools (tools/list stays empty)
        agent:hang|silent_exit|is_error|overloaded|rate_limit|auth|mcp_failed|crash
              |missing (no Claude Code in the template)
    SIM_MCP_STATUS=pending    the gateway's status in Claude Code's init event (default
                              connected; pending lists none of its tools yet, as real runs do)
    SIM_TOOLS=Bash,Read       the tool calls the agent attempts, in order (with SIM_TOOL_CALLS)
    SIM_OUTPUT='[A, B]'       the agent's answer per turn of its session (JSON list; the last
                              repeats): the `structured_output` under --json-schema (one the
                              CLI's own check refuses ends error_max_structured_output_retries),
                              else the final text (a string as is, other values as JSON)
    SIM_EDITS={"a.txt": "x"}  files the agent writes in its working directory when it starts
                              (null deletes one): what `collect` and the repo diff bring back

Live simulated sandboxes are recorded in Redis (when given a client) so tests, the reaper
and other processes can see them, as they would list real ones.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import redis

from sandqueue import errors, keys
from sandqueue.settings import Settings
from sandqueue.store import as_text
from worker.sandbox.base import (
    CommandResult,
    FileEntry,
    LiveSandbox,
    OutputCallback,
    RunningCommand,
    Sandbox,
    SandboxProvider,
    SandboxSpec,
)
from worker.sandbox.sim_disk import SimDisk
from worker.sandbox.sim_shell import argv_of, gateway_tools
from worker.writebehind import WriteBehind

SIM_FAILURES: dict[str, tuple[str, ...]] = {
    "create": ("rate_limit", "unavailable", "auth", "gateway_config", "template"),
    "gateway": ("timeout", "unauthorized", "no_tools"),
    "agent": ("hang", "silent_exit", "is_error", "overloaded", "rate_limit", "auth",
              "mcp_failed", "crash", "missing"),
}
"""Every SIM_FAIL directive the simulated provider acts on, by where it strikes."""


def parse_failures(spec: str) -> dict[tuple[str, str], int | None]:
    """`create:rate_limit:2,agent:hang` -> {("create","rate_limit"): 2, ("agent","hang"): None}

    A directive this provider does not know is the task's mistake (a typo would otherwise
    make a "failure test" silently succeed): InvalidTask, permanent, naming the valid ones.
    """
    out: dict[tuple[str, str], int | None] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) not in (2, 3) or not all(parts):
            raise errors.InvalidTask(
                f"SIM_FAIL item {item!r} must be where:what[:attempts], "
                "e.g. create:rate_limit:2 or agent:hang"
            )
        where, what = parts[0], parts[1]
        if what not in SIM_FAILURES.get(where, ()):
            raise errors.InvalidTask(f"SIM_FAIL item {item!r} is not a simulated failure; "
                                     f"known: {_known_failures()}")
        out[(where, what)] = _attempt_count(item, parts[2]) if len(parts) == 3 else None
    return out


def _attempt_count(item: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise errors.InvalidTask(
            f"SIM_FAIL item {item!r}: the attempt count {text!r} must be a whole number "
            "of at least 1 (omit it to fail every attempt)"
        )
    return int(text)


def _known_failures() -> str:
    return ", ".join(f"{where}:{'|'.join(whats)}" for where, whats in SIM_FAILURES.items())


class _Registry:
    """Where live sim sandboxes are recorded: Redis when shared, else this process.

    With a `writer` (the worker's write-behind), recording costs no round trip of its own."""

    def __init__(self, client: redis.Redis | None, writer: WriteBehind | None = None) -> None:
        self.r = client
        self.writer = writer
        self.local: dict[str, dict[str, Any]] = {}
        self.created = 0
        self.killed = 0

    def _send(self, write: Callable[[Any], None]) -> None:
        assert self.r is not None
        if self.writer is not None:
            self.writer.submit(write)
            return
        pipe = self.r.pipeline(transaction=False)
        write(pipe)
        pipe.execute()

    def add(self, sandbox_id: str, metadata: dict[str, str], end_at: float) -> None:
        record = {"metadata": metadata, "started_at": time.time(), "end_at": end_at}
        if self.r is None:
            self.local[sandbox_id] = record
            self.created += 1
            return

        def write(pipe: Any) -> None:
            pipe.set(keys.sim_sandbox(sandbox_id), json.dumps(record), exat=int(end_at) + 1)
            pipe.sadd(keys.SIM_LIVE, sandbox_id)
            pipe.incr(keys.SIM_CREATED)

        self._send(write)

    def remove_own(self, sandbox_id: str) -> None:
        """A sandbox this process created and now kills (known alive: count it)."""
        if self.r is None:
            self.remove(sandbox_id)
            return

        def write(pipe: Any) -> None:
            pipe.delete(keys.sim_sandbox(sandbox_id))
            pipe.srem(keys.SIM_LIVE, sandbox_id)
            pipe.incr(keys.SIM_KILLED)

        self._send(write)

    def remove(self, sandbox_id: str) -> bool:
        if self.r is None:
            gone = self.local.pop(sandbox_id, None) is not None
            self.killed += gone
            return gone
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(keys.sim_sandbox(sandbox_id))
        pipe.srem(keys.SIM_LIVE, sandbox_id)
        deleted, removed = pipe.execute()
        if deleted or removed:
            self.r.incr(keys.SIM_KILLED)
        return bool(deleted)

    def live(self) -> list[LiveSandbox]:
        now = time.time()
        if self.r is None:
            items = list(self.local.items())
        else:
            ids = sorted(as_text(m)
                         for m in self.r.smembers(keys.SIM_LIVE))
            raw = self.r.mget([keys.sim_sandbox(i) for i in ids]) if ids else []
            items = []
            for sandbox_id, value in zip(ids, raw, strict=True):
                if value is None:  # expired like E2B reaps a sandbox at its timeout
                    self.r.srem(keys.SIM_LIVE, sandbox_id)
                    continue
                items.append((sandbox_id, json.loads(value)))
        return [
            LiveSandbox(sid, rec["metadata"], datetime.fromtimestamp(rec["started_at"], UTC))
            for sid, rec in items
            if rec["end_at"] > now
        ]


class SimCommand(RunningCommand):
    """A scripted process: `script` yields (delay_s, stream, text) steps, then an exit code."""

    def __init__(self, script: Callable[[SimCommand], int], on_stdout: OutputCallback,
                 on_stderr: OutputCallback) -> None:
        self._script = script
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.killed = threading.Event()

    def sleep(self, seconds: float) -> bool:
        """Wait like a process does; False when killed meanwhile."""
        timeout = None if seconds == float("inf") else max(0.0, seconds)
        return not self.killed.wait(timeout)

    def emit(self, text: str, stream: str = "stdout") -> None:
        """Deliver text in chunks of random size, splitting lines as a network stream does."""
        sink = self.on_stdout if stream == "stdout" else self.on_stderr
        i = 0
        while i < len(text):
            n = random.randint(1, 512)  # lines are split, as network chunks split them
            sink(text[i:i + n])
            i += n

    def wait(self) -> int:
        if self.killed.is_set():
            return 137
        code = self._script(self)
        return 137 if self.killed.is_set() else code

    def kill(self) -> None:
        self.killed.set()


class SimSandbox(Sandbox):
    simulated = True

    def __init__(self, provider: SimProvider, spec: SandboxSpec,
                 attempt_fails: set[tuple[str, str]]) -> None:
        self.sandbox_id = f"sim-{uuid.uuid4().hex[:16]}"
        self._provider = provider
        self._spec = spec
        self._fails = attempt_fails
        self._token = uuid.uuid4().hex
        self.files: dict[str, bytes] = {}
        self.commands: list[SimCommand] = []
        self.command_lines: list[str] = []
        """Every command line started here, in order (tests read the flags a run got)."""
        self.executed_tools: list[str] = []
        """Tool calls the scripted agent's permissions let run (denied ones are not here)."""
        self._dead = False
        self._disk: SimDisk | None = None

    def fails(self, where: str, what: str) -> bool:
        return (where, what) in self._fails

    def mcp_url(self) -> str:
        return f"https://50005-{self.sandbox_id}.sim.invalid/mcp"

    def mcp_token(self) -> str:
        return self._token

    def wait_gateway_ready(self, timeout_s: float, servers: list[str]) -> list[str]:
        self._alive()
        if self.fails("gateway", "timeout"):
            raise errors.GatewayTimeout(
                f"[simulated] the MCP gateway did not answer within {timeout_s:.0f}s"
            )
        if self.fails("gateway", "no_tools"):
            raise errors.GatewayTimeout(
                f"[simulated] the MCP gateway did not list tools for {', '.join(servers)} "
                f"within {timeout_s:.0f}s (last: tools/list listed no tools yet)")
        if self.fails("gateway", "unauthorized"):
            # As E2B's gateway answers a wrong token: permanent, waiting or retrying cannot help.
            raise errors.AuthError("[simulated] the MCP gateway refused its bearer token "
                                   "(HTTP 401): waiting cannot fix that")
        return gateway_tools(self._spec.mcp)

    def write_file(self, path: str, data: str | bytes) -> None:
        self._alive()
        self.files[path] = data.encode() if isinstance(data, str) else bytes(data)
        if self._disk is not None:
            self._disk.write(path, self.files[path])

    def run(self, cmd: str, *, timeout_s: float, envs: dict[str, str] | None = None,
            cwd: str | None = None) -> CommandResult:
        self._alive()
        argv, _ = argv_of(cmd)
        if argv and argv[0] == "git":
            return self.disk.git(argv, timeout_s=timeout_s, envs=envs or {}, cwd=cwd)
        program = self._program(cmd)
        if program is not None and argv[1:] == ["--version"]:
            return CommandResult(*program(self, cmd, dict(self._spec.envs)).version())
        return CommandResult(127, "", f"[simulated] {argv[0] if argv else cmd}: command not "
                                      "found\n")

    def start(self, cmd: str, *, on_stdout: OutputCallback, on_stderr: OutputCallback,
              timeout_s: float, envs: dict[str, str] | None = None) -> RunningCommand:
        self._alive()
        program = self._program(cmd)
        if program is None:
            def missing(proc: SimCommand) -> int:
                proc.emit(f"bash: {cmd.split()[0]}: command not found\n", "stderr")
                return 127
            script: Callable[[SimCommand], int] = missing
        else:
            script = program(self, cmd, {**self._spec.envs, **(envs or {})}).script
        command = SimCommand(script, on_stdout, on_stderr)
        self.commands.append(command)
        self.command_lines.append(cmd)
        return command

    def _program(self, cmd: str) -> SimProgram | None:
        """The scripted CLI a command line runs (`cd DIR && exec NAME ...`), by name."""
        argv, _ = argv_of(cmd)
        return self._provider.programs.get(argv[0].rsplit("/", 1)[-1]) if argv else None

    # -- workspace in and out (issue 12) -------------------------------------------------
    @property
    def disk(self) -> SimDisk:
        """The sandbox's filesystem, a temporary directory made on first use (with the
        files written so far): a task that clones, edits or lists nothing never pays for
        one (about 5 ms a sandbox on a busy machine, which the benchmarks would count)."""
        if self._disk is None:
            self._disk = SimDisk(self._provider.settings.sandbox_user)
            for path, data in self.files.items():
                self._disk.write(path, data)
        return self._disk

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        self._alive()
        if self._disk is None:
            if path not in self.files:
                raise errors.SandboxFileNotFound(f"[simulated] reading {path}: no such file")
            return self.files[path][:max_bytes]
        return self.disk.read(path, max_bytes)

    def list_files(self, path: str, depth: int) -> list[FileEntry]:
        self._alive()
        return self.disk.list(path, depth)
    # -- end of workspace in and out

    def kill(self) -> None:
        if self._dead:
            return
        self._dead = True
        self.killed = True
        for command in self.commands:
            command.kill()
        if self._disk is not None:
            self._disk.remove()
        self._provider.forget(self.sandbox_id)

    def _alive(self) -> None:
        if self._dead:
            raise errors.SandboxUnavailable(
                f"[simulated] sandbox {self.sandbox_id} was killed or reached its timeout"
            )

    @property
    def spec(self) -> SandboxSpec:
        return self._spec


    @property
    def user(self) -> str:
        return self._provider.settings.sandbox_user

    @property
    def default_latency_s(self) -> float:
        return self._provider.settings.sim_latency_s


class SimProgram(Protocol):
    """A scripted CLI inside simulated sandboxes: built per command line, it runs as a
    process (`script`) or answers `--version`."""

    def __call__(self, sandbox: SimSandbox, cmd: str,
                 envs: dict[str, str]) -> Any: ...


class SimProvider(SandboxProvider):
    name = "sim"
    simulated = True

    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 writer: WriteBehind | None = None) -> None:
        from worker.sandbox.sim_agent import ScriptedAgent

        self.programs: dict[str, SimProgram] = {"claude": ScriptedAgent}
        """The CLIs simulated sandboxes have, by name: Claude Code's stand-in; another
        agent's stand-in can be added beside it."""
        self.settings = settings
        self.registry = _Registry(client, writer)
        self._live: dict[str, SimSandbox] = {}
        self._lock = threading.Lock()

    def create(self, spec: SandboxSpec) -> Sandbox:
        fails = {
            key for key, n in parse_failures(spec.envs.get("SIM_FAIL", "")).items()
            if n is None or spec.attempt <= n
        }
        latency = float(spec.envs.get("SIM_CREATE_LATENCY_S",
                                      self.settings.sim_create_latency_s))
        time.sleep(latency)
        for what, exc, msg in (
            ("rate_limit", errors.RateLimited, "E2B rate limit (429)"),
            ("unavailable", errors.SandboxUnavailable, "E2B is busy (503)"),
            ("auth", errors.AuthError, "E2B refused the API key; check E2B_API_KEY"),
            ("gateway_config", errors.McpConfigError,
             "Failed to start MCP gateway: invalid server configuration"),
            ("template", errors.InvalidTask, "template not found"),
        ):
            if ("create", what) in fails:
                raise exc(f"[simulated] creating the sandbox: {msg}")
        sandbox = SimSandbox(self, spec, fails)
        with self._lock:
            self._live[sandbox.sandbox_id] = sandbox
        self.registry.add(sandbox.sandbox_id, spec.metadata(), time.time() + spec.lifetime_s)
        return sandbox

    def forget(self, sandbox_id: str) -> None:
        with self._lock:
            self._live.pop(sandbox_id, None)
        self.registry.remove_own(sandbox_id)

    def list_live(self) -> list[LiveSandbox]:
        return self.registry.live()

    def kill(self, sandbox_id: str) -> bool:
        with self._lock:
            local = self._live.get(sandbox_id)
        if local is not None:
            local.kill()
            return True
        return self.registry.remove(sandbox_id)
