"""The sandbox interface the pipeline and the agent adapter program against.

Semantics follow the `e2b` SDK, which the simulated provider imitates: `start` returns at
once with a handle; output arrives through callbacks in chunks that may split lines;
`wait` returns the exit code (non-zero is a value here, not an exception, because the agent
adapter decides what a failed agent run means); `kill` on a handle stops that command, on a
sandbox stops everything. Every provider error is a `sandqueue.errors.SandqueueError`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

OutputCallback = Callable[[str], None]

META_TASK_ID = "sandqueue_task_id"
META_ATTEMPT = "sandqueue_attempt"
META_DEADLINE = "sandqueue_deadline_at"
META_APP = "sandqueue"


@dataclass(frozen=True)
class SandboxSpec:
    """What one attempt asks of a sandbox. `mcp` and `envs` hold resolved secrets: never log."""

    task_id: str
    attempt: int
    lifetime_s: int
    deadline_at: float
    template: str | None = None
    mcp: dict[str, Any] = field(default_factory=dict, repr=False)
    envs: dict[str, str] = field(default_factory=dict, repr=False)
    labels: dict[str, str] = field(default_factory=dict)
    request_timeout_s: float = 60.0

    def metadata(self) -> dict[str, str]:
        """Tags every sandbox so a reaper can find it again and tell whose it is."""
        meta = {META_APP: "1", META_TASK_ID: self.task_id, META_ATTEMPT: str(self.attempt),
                META_DEADLINE: f"{self.deadline_at:.0f}"}
        for key, value in self.labels.items():
            meta.setdefault(f"label_{key}"[:64], value[:256])
        return meta


@dataclass(frozen=True)
class TemplateRecipe:
    """What a sandbox template needs for an agent, said without any provider's API: a base
    template, global npm packages (installed as root), and a command that must succeed as
    the sandbox user to prove the agent runs there."""

    base: str
    npm_global: tuple[str, ...] = ()
    check_command: str | None = None


@dataclass(frozen=True)
class LiveSandbox:
    sandbox_id: str
    metadata: dict[str, str]
    started_at: datetime | None = None


@dataclass(frozen=True)
class FileEntry:
    """One entry of a sandbox directory listing (`Sandbox.list_files`)."""

    path: str
    size: int
    is_dir: bool


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class RunningCommand(abc.ABC):
    """A command started in a sandbox; its output flows to the callbacks given to `start`."""

    @abc.abstractmethod
    def wait(self) -> int:
        """Block until the command ends; return its exit code."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the command (SIGKILL); `wait` then returns promptly. Never raises."""


class Sandbox(abc.ABC):
    sandbox_id: str
    simulated: bool = False
    killed: bool = False
    """True once `kill` was confirmed (the provider said it is gone); results report it."""

    @abc.abstractmethod
    def mcp_url(self) -> str: ...

    @abc.abstractmethod
    def mcp_token(self) -> str: ...

    @abc.abstractmethod
    def wait_gateway_ready(self, timeout_s: float, servers: list[str]) -> list[str]:
        """Return the MCP tools the gateway lists once it lists any; raise GatewayTimeout
        (naming `servers`) after timeout_s, AuthError if it refuses its token."""

    @abc.abstractmethod
    def write_file(self, path: str, data: str | bytes) -> None:
        """Write a file as the sandbox user (byte-exact; no shell involved)."""

    @abc.abstractmethod
    def run(self, cmd: str, *, timeout_s: float, envs: dict[str, str] | None = None,
            cwd: str | None = None) -> CommandResult:
        """Run a short command to completion; a non-zero exit is returned, not raised.
        `envs` are set for this command only (how a secret reaches one command without
        being written anywhere in the sandbox); `cwd` must exist."""

    # -- workspace in and out (issue 12) -------------------------------------------------
    @abc.abstractmethod
    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes (at most `max_bytes`, read no further); NotFound-style errors
        raise `errors.SandboxFileNotFound`."""

    @abc.abstractmethod
    def list_files(self, path: str, depth: int) -> list[FileEntry]:
        """Entries under the directory `path`, `depth` levels down, with absolute paths;
        symlinks are not followed. `errors.SandboxFileNotFound` if there is no such dir."""
    # -- end of workspace in and out

    @abc.abstractmethod
    def start(
        self,
        cmd: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout_s: float,
        envs: dict[str, str] | None = None,
    ) -> RunningCommand:
        """Start a long command; chunks of its output go to the callbacks as they arrive."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Destroy the sandbox. Idempotent; never raises (a failure is logged)."""


class SandboxProvider(abc.ABC):
    name: str
    simulated: bool = False

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> Sandbox:
        """Create a sandbox with the MCP gateway started, or raise a SandqueueError."""

    @abc.abstractmethod
    def list_live(self) -> list[LiveSandbox]:
        """Live sandboxes created by sandqueue (found by their metadata)."""

    @abc.abstractmethod
    def kill(self, sandbox_id: str) -> bool:
        """Kill a sandbox by id; False when it was already gone."""

    @contextmanager
    def session(self, spec: SandboxSpec) -> Iterator[Sandbox]:
        """A sandbox that is killed however the block ends: they cost money while alive."""
        sandbox = self.create(spec)
        try:
            yield sandbox
        finally:
            sandbox.kill()
