"""A fake E2B cloud underneath the real `e2b` SDK, so tests run the SDK's own code offline.

Only the SDK's network boundaries are replaced; everything above them is the installed `e2b`
package:

* The control-plane API. `FakeSandbox` subclasses `e2b.Sandbox` and overrides only the
  classmethods that make HTTP calls (`_create`, `_cls_kill`, `list`). The real
  `Sandbox.create` therefore runs: it picks the template, sets `sandbox._mcp_token`, starts
  `mcp-gateway` with `sandbox.commands.run(...)`, and when that exits non-zero it kills the
  sandbox and raises `SandboxException("Failed to start MCP gateway: <stderr>")` itself.
  The fake API validates the idempotency key with the SDK's own `resolve_idempotency_key`
  and builds errors with the SDK's own `api_exception_from_code`.
* envd inside each sandbox. Each sandbox object is built by the real `Sandbox.__init__`, so
  it has the real `Commands` and `Filesystem`; only their transports are swapped. The
  process RPC client becomes `FakeProcessRpc`, whose `start` yields real
  `process_pb.StartResponse` events, so the real `CommandHandle` decodes UTF-8
  incrementally, raises `CommandExitException` on a non-zero exit and maps stream errors
  (`ConnectError`) through the SDK's health probe. The envd HTTP clients get an
  `httpx.MockTransport` serving `/files` (multipart upload, download) and `/health` as envd
  and the E2B proxy do (502 "was not found" once the sandbox is gone).

Processes are scripts: generator functions taking a `FakeProcess` and yielding `Out`, `Err`,
`Sleep`, `Exit` or `Break` steps, looked up by program name. A sleeping process wakes when it
is SIGKILLed (its stream then ends with exit code -1, what envd reports for a process killed
by a signal) or when its sandbox is killed (its stream then breaks with UNAVAILABLE, which
the SDK's health probe turns into `SandboxNotRunningException`). A stream outliving its
`timeout` breaks with DEADLINE_EXCEEDED, which the SDK maps to `TimeoutException`.

No traffic leaves the process: every transport the product can reach is a mock, and the
control-plane URL of the sandbox objects points at a closed loopback port as a backstop.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import random
import re
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import e2b
import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.api import api_exception_from_code
from e2b.api.client.models.sandbox_state import SandboxState
from e2b.connection_config import ConnectionConfig
from e2b.envd.filesystem import filesystem_pb
from e2b.envd.process import process_pb
from e2b.retry import resolve_idempotency_key
from e2b.sandbox.sandbox_api import SandboxInfo, SandboxQuery
from e2b.sandbox.utils import class_method_variant
from e2b.sandbox_sync.paginator import SandboxPaginator
from packaging.version import Version
from protobuf import Oneof

from tests.fakes.mcp_gateway import FakeMcpGateway, edge_port_closed

KILLED_EXIT_CODE = -1
"""envd reports Go's `ProcessState.ExitCode()`, which is -1 for a process killed by a signal."""

UNREACHABLE_API_URL = "http://127.0.0.1:9"
"""Control-plane URL given to sandbox objects: an unmocked API call fails on loopback."""

GATEWAY_PORT = 50005

MAX_ARG_STRLEN = 32 * 4096
"""Linux's limit on one argument of exec, its terminating NUL included: the command envd runs
as `/bin/bash -l -c <cmd>` is one argument."""

DIES = object()
"""A `FakeEnvd.read_failures` entry: the sandbox dies as that download is asked."""


# -- process scripts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """Bytes the process writes to stdout (one envd data event)."""

    data: bytes


@dataclass(frozen=True)
class Err:
    """Bytes the process writes to stderr (one envd data event)."""

    data: bytes


@dataclass(frozen=True)
class Sleep:
    """Block like a process does; cut short by SIGKILL, sandbox death or the stream timeout."""

    seconds: float


@dataclass(frozen=True)
class Exit:
    """End the process with this exit code."""

    code: int
    error: str | None = None


@dataclass(frozen=True)
class Break:
    """The stream dies before an end event (envd or the proxy dropped it)."""

    code: Code = Code.UNAVAILABLE
    message: str = "the connection to the sandbox ended before the stream completed"


Step = Out | Err | Sleep | Exit | Break
Script = Callable[["FakeProcess"], Iterable[Step]]
HANG = Sleep(math.inf)


def chunked(data: bytes | str, rng: random.Random, max_size: int = 23,
            stream: type[Out] | type[Err] = Out) -> list[Step]:
    """Split output at random byte offsets, even inside a UTF-8 character, as a network does."""
    raw = data.encode() if isinstance(data, str) else data
    steps: list[Step] = []
    i = 0
    while i < len(raw):
        n = rng.randint(1, max_size)
        steps.append(stream(raw[i:i + n]))
        i += n
    return steps


def parse_command(cmd: str) -> tuple[list[str], str | None, str | None]:
    """(argv, stdin file, working dir) of `[cd DIR &&] [exec] PROG ARGS... [< FILE]` as bash."""
    tokens = shlex.split(cmd)
    cwd = None
    if len(tokens) >= 3 and tokens[0] == "cd" and tokens[2] == "&&":
        cwd, tokens = tokens[1], tokens[3:]
    if tokens and tokens[0] == "exec":
        tokens = tokens[1:]
    stdin = None
    if "<" in tokens:
        i = tokens.index("<")
        stdin = tokens[i + 1] if i + 1 < len(tokens) else ""
        tokens = tokens[:i] + tokens[i + 2:]
    return tokens, stdin, cwd


@dataclass(eq=False)
class FakeProcess:
    """A process as envd runs it: `/bin/bash -l -c <cmd>` as a user, with merged envs."""

    pid: int
    cmd: str
    argv: list[str]
    stdin_path: str | None
    envs: dict[str, str]
    user: str
    cwd: str | None
    timeout_ms: int | None
    sandbox: FakeEnvd
    killed: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    exit_code: int | None = None

    @property
    def program(self) -> str:
        return self.argv[0].rsplit("/", 1)[-1] if self.argv else ""

    def arg(self, flag: str) -> str | None:
        """The value after `flag` on the command line, if given."""
        if flag in self.argv[:-1]:
            return self.argv[self.argv.index(flag) + 1]
        return None

    def stdin(self) -> bytes:
        return self.sandbox.files[self.stdin_path or ""]


def _unknown_program(proc: FakeProcess) -> Iterator[Step]:
    yield Err(f"bash: line 1: {proc.argv[0] if proc.argv else ''}: command not found\n".encode())
    yield Exit(127)


def _missing_stdin(proc: FakeProcess) -> Iterator[Step]:
    yield Err(f"bash: line 1: {proc.stdin_path}: No such file or directory\n".encode())
    yield Exit(1)


def _event(**oneof: Any) -> process_pb.StartResponse:
    ((name, value),) = oneof.items()
    return process_pb.StartResponse(event=process_pb.ProcessEvent(event=Oneof(name, value)))


def _data(stream: str, chunk: bytes) -> process_pb.StartResponse:
    return _event(data=process_pb.ProcessEvent.DataEvent(output=Oneof(stream, chunk)))


def _end(code: int, error: str | None) -> process_pb.StartResponse:
    status = "signal: killed" if code == KILLED_EXIT_CODE else f"exit status {code}"
    kwargs: dict[str, Any] = {"exit_code": code, "exited": code >= 0, "status": status}
    if error is not None:
        kwargs["error"] = error
    return _event(end=process_pb.ProcessEvent.EndEvent(**kwargs))


def _basic_user(headers: Mapping[str, str]) -> str | None:
    auth = dict(headers).get("Authorization", "")
    if not auth.startswith("Basic "):
        return None
    return base64.b64decode(auth.removeprefix("Basic ")).decode().split(":", 1)[0] or None


def _multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each part of a multipart/form-data body, byte-exact."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ValueError(f"no multipart boundary in {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    parts: list[tuple[str, bytes]] = []
    for segment in body.split(delimiter)[1:]:
        if segment.startswith(b"--"):
            break
        head, _, data = segment.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = re.search(rb'filename="([^"]*)"', head)
        parts.append(((name.group(1).decode() if name else ""), data.removesuffix(b"\r\n")))
    return parts


class _Unwired:
    """Stands where the product has no business: any use fails the test instead of the network."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the fake E2B does not implement {self._what}.{name}")


# -- envd: one sandbox's processes and files -------------------------------------------


class FakeProcessRpc:
    """Stands in for connectrpc's `ProcessClientSync`: the same method signatures."""

    def __init__(self, envd: FakeEnvd) -> None:
        self._envd = envd

    def start(self, request: process_pb.StartRequest, *,
              headers: Mapping[str, str] | None = None,
              timeout_ms: int | None = None) -> Iterator[process_pb.StartResponse]:
        return self._envd.run_process(request, headers or {}, timeout_ms)

    def send_signal(self, request: process_pb.SendSignalRequest, *,
                    headers: Mapping[str, str] | None = None,
                    timeout_ms: int | None = None) -> process_pb.SendSignalResponse:
        return self._envd.signal(request)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the fake envd does not implement Process.{name}")


class FakeFilesystemRpc:
    """Stands in for connectrpc's `FilesystemClientSync`: `list_dir` only, over the
    envd's flat file map (directories are the prefixes of its paths), answering a missing
    directory with NOT_FOUND as envd does (the SDK maps it to FileNotFoundException)."""

    def __init__(self, envd: FakeEnvd) -> None:
        self._envd = envd

    def list_dir(self, request: filesystem_pb.ListDirRequest, *,
                 headers: Mapping[str, str] | None = None,
                 timeout_ms: int | None = None) -> filesystem_pb.ListDirResponse:
        if not self._envd.running:  # the proxy's 502, as connectrpc reports it
            raise ConnectError(Code.UNAVAILABLE, f"The sandbox {self._envd.sandbox_id} was "
                               "not found")
        self._envd.list_calls.append((request.path, request.depth))
        if self._envd.list_failures:
            raise self._envd.list_failures.popleft()
        base = request.path.rstrip("/")
        depth = request.depth or 1
        if base in self._envd.symlinks:  # envd resolves a link given as the path (dir.go)
            return self._through_link(base, self._envd.symlinks[base].rstrip("/"), depth)
        found: dict[str, filesystem_pb.EntryInfo] = {}
        for path, data in list(self._envd.files.items()):
            if not path.startswith(base + "/"):
                continue
            parts = path[len(base) + 1:].split("/")
            for level in range(1, min(len(parts), depth) + 1):
                sub = f"{base}/{'/'.join(parts[:level])}"
                is_file = level == len(parts)
                found.setdefault(sub, filesystem_pb.EntryInfo(
                    name=parts[level - 1], path=sub, size=len(data) if is_file else 4096,
                    type=filesystem_pb.FileType.FILE if is_file
                    else filesystem_pb.FileType.DIRECTORY))
        for path, target in self._envd.symlinks.items():
            parts = path[len(base) + 1:].split("/")
            if path.startswith(base + "/") and len(parts) <= depth:
                found[path] = filesystem_pb.EntryInfo(
                    name=parts[-1], path=path, is_symlink=True, symlink_target=target,
                    size=len(self._envd.files.get(target, b"")),
                    type=filesystem_pb.FileType.FILE if target in self._envd.files
                    else filesystem_pb.FileType.DIRECTORY)
        if not found and base not in self._envd.dirs:
            raise ConnectError(Code.NOT_FOUND, f"path '{request.path}' does not exist")
        return filesystem_pb.ListDirResponse(entries=list(found.values()))

    def _through_link(self, link: str, target: str, depth: int
                      ) -> filesystem_pb.ListDirResponse:
        """The target's entries, named under the link's path (the worst case for a caller
        that trusts the names: they look like files below the link)."""
        inner = self.list_dir(filesystem_pb.ListDirRequest(path=target, depth=depth))
        return filesystem_pb.ListDirResponse(entries=[
            filesystem_pb.EntryInfo(name=e.name, type=e.type, size=e.size,
                                    path=link + e.path[len(target):])
            for e in inner.entries])

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the fake envd does not implement Filesystem.{name}")


class FakeEnvd:
    """What runs inside one sandbox: files, processes, the MCP gateway's state."""

    def __init__(self, cloud: FakeE2BCloud, sandbox_id: str, *, template: str,
                 metadata: dict[str, str], envs: dict[str, str], mcp: Any,
                 timeout: int | None) -> None:
        self.cloud = cloud
        self.sandbox_id = sandbox_id
        self.template = template
        self.metadata = dict(metadata)
        self.envs = dict(envs)
        self.mcp = mcp
        self.timeout = timeout
        self.started_at = datetime.now(UTC)
        self.access_token = uuid.uuid4().hex
        self.running = True
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/home/user"}
        """Directories that exist even when empty (others are implied by files)."""
        self.symlinks: dict[str, str] = {}
        """Symbolic links (path -> absolute target): listed as links and not walked into,
        as envd's `ListDir` (filepath.WalkDir; `is_symlink` set, `type` the target's);
        followed by `/files` downloads, as envd opens the path."""
        self.file_owners: dict[str, str] = {}
        self.processes: list[FakeProcess] = []
        self.signals: list[tuple[int, Any]] = []
        self.programs: dict[str, Script] = dict(cloud.programs)
        self.write_failures: deque[httpx.Response | Exception] = deque()
        self.read_failures: deque[httpx.Response | Exception | object] = deque()
        """Answers to the next `/files` downloads: a response (e.g. the edge's 429), an
        exception raised by the transport (e.g. `httpx.ReadError`, a dropped connection), or
        `DIES`: the sandbox dies (killed, or at its timeout) as the download is asked."""
        self.list_calls: list[tuple[str, int]] = []
        """(path, depth) of every `ListDir` asked."""
        self.list_failures: deque[Exception] = deque()
        """Errors raised by the next `ListDir` calls (e.g. `ConnectError(RESOURCE_EXHAUSTED)`)."""
        self.start_failures: deque[Exception] = deque()
        self.signal_failures: deque[Exception] = deque()
        self.gateway_token: str | None = None
        self.gateway_user: str | None = None
        self.gateway_config: Any = None
        self.mcp_gateway: FakeMcpGateway | None = None
        self.gateway_requests = 0
        self.clients: list[e2b.Sandbox] = []
        self._pids = itertools.count(1000)
        self._lock = threading.Lock()
        self.rpc = FakeProcessRpc(self)
        self.transport = httpx.MockTransport(self.handle_http)

    # -- wiring the real SDK objects to this fake -------------------------------------
    def attach(self, client: e2b.Sandbox) -> None:
        """Point the transports of a real SDK sandbox object at this envd; keep its logic."""

        def http() -> httpx.Client:
            return httpx.Client(base_url=client.envd_api_url, transport=self.transport,
                                headers=client.connection_config.sandbox_headers)

        client._envd_api = http()
        commands = client.commands
        commands._rpc = self.rpc  # type: ignore[assignment]
        commands._envd_api = http()
        commands._envd_health_api = http()
        files = client.files
        files._envd_api = http()
        files._envd_api_download = http()
        files._envd_api_streaming = http()
        files._envd_health_api = http()
        files._rpc = FakeFilesystemRpc(self)  # type: ignore[assignment]
        client.pty._rpc = _Unwired("Pty RPC")  # type: ignore[assignment]
        self.clients.append(client)

    def shutdown(self) -> None:
        """The sandbox dies: envd stops answering and every stream breaks."""
        with self._lock:
            self.running = False
            processes = list(self.processes)
        for proc in processes:
            proc.wake.set()

    @property
    def gateway_url(self) -> str:
        return f"https://{GATEWAY_PORT}-{self.sandbox_id}.{self.cloud.domain}/mcp"

    def resolve(self, path: str) -> str:
        """The path with its symlinks followed, in any component, as the kernel does."""
        for _ in range(40):  # Linux's MAXSYMLINKS
            for link, target in self.symlinks.items():
                if path == link or path.startswith(link + "/"):
                    path = target.rstrip("/") + path[len(link):]
                    break
            else:
                return path
        return path

    def is_dir(self, path: str) -> bool:
        """Whether `path` is a directory: made empty, or implied by a file under it."""
        path = path.rstrip("/") or "/"
        return path in self.dirs or path == "/" or any(
            f.startswith(path + "/") for f in list(self.files))

    def processes_of(self, program: str) -> list[FakeProcess]:
        return [p for p in self.processes if p.program == program]

    # -- envd HTTP API ------------------------------------------------------------------
    def _gone(self) -> httpx.Response:
        # What the E2B proxy answers for a sandbox that was killed or reached its timeout.
        return httpx.Response(502, json={"code": 502, "sandboxId": self.sandbox_id,
                                         "message": f"The sandbox {self.sandbox_id} was not found"})

    def handle_http(self, request: httpx.Request) -> httpx.Response:
        if not self.running:
            return self._gone()
        path = request.url.path
        if path == "/health":
            return httpx.Response(204)
        if path == "/files" and request.method == "POST":
            return self._upload(request)
        if path == "/files" and request.method == "GET":
            if self.read_failures:
                failure = self.read_failures.popleft()
                if failure is DIES:
                    self.shutdown()
                    return self._gone()
                if isinstance(failure, Exception):
                    raise failure
                return failure
            name = request.url.params.get("path", "")
            name = self.resolve(name)
            if name not in self.files:
                return httpx.Response(404, json={"code": 404,
                                                 "message": f"path '{name}' does not exist"})
            return httpx.Response(200, content=self.files[name])
        return httpx.Response(404, json={"code": 404, "message": f"no route {path}"})

    def _upload(self, request: httpx.Request) -> httpx.Response:
        if self.write_failures:
            failure = self.write_failures.popleft()
            if isinstance(failure, Exception):
                raise failure
            return failure
        user = request.url.params.get("username") or "user"
        body = request.read()
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            parts = _multipart(body, content_type)
        else:
            parts = [(request.url.params.get("path", ""), body)]
        single = request.url.params.get("path")
        written = []
        for name, data in parts:
            path = single if single and len(parts) == 1 else name
            self.files[path] = data
            self.file_owners[path] = user
            written.append({"name": path.rsplit("/", 1)[-1], "type": "file", "path": path})
        return httpx.Response(200, json=written)

    # -- envd process RPC ---------------------------------------------------------------
    def run_process(self, request: process_pb.StartRequest, headers: Mapping[str, str],
                    timeout_ms: int | None) -> Iterator[process_pb.StartResponse]:
        """A server stream, lazy like connectrpc's: nothing runs until the first event is read."""
        if not self.running:
            raise ConnectError(Code.UNAVAILABLE, f"The sandbox {self.sandbox_id} was not found")
        if self.start_failures:
            raise self.start_failures.popleft()
        config = request.process
        assert config is not None and config.cmd == "/bin/bash"
        args = list(config.args)
        assert args[:2] == ["-l", "-c"] and len(args) == 3, args
        if len(args[2].encode("utf-8", "surrogatepass")) >= MAX_ARG_STRLEN:
            # exec fails with E2BIG; envd's StartErrorCode maps it to INVALID_ARGUMENT, its
            # message quoting the whole command (handler.go "error starting process '%s'")
            raise ConnectError(Code.INVALID_ARGUMENT, f"error starting process '/bin/bash -l -c "
                               f"{args[2]}': fork/exec /bin/bash: argument list too long")
        argv, stdin_path, cwd = parse_command(args[2])
        if config.has_field("cwd") and config.cwd and not self.is_dir(config.cwd):
            # envd (process/handler/handler.go) refuses to start the process
            raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{config.cwd}' does not exist")
        with self._lock:
            proc = FakeProcess(
                pid=next(self._pids), cmd=args[2], argv=argv, stdin_path=stdin_path,
                envs={**self.envs, **dict(config.envs)}, user=_basic_user(headers) or "user",
                cwd=cwd or (config.cwd if config.has_field("cwd") else None),
                timeout_ms=timeout_ms, sandbox=self,
            )
            self.processes.append(proc)
        deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else math.inf
        yield _event(start=process_pb.ProcessEvent.StartEvent(pid=proc.pid))
        yield _event(keepalive=process_pb.ProcessEvent.KeepAlive())
        try:
            code, error = yield from self._execute(proc, deadline)
            proc.exit_code = code
        finally:
            proc.ended.set()
        yield _end(code, error)

    def _script(self, proc: FakeProcess) -> Script:
        if proc.stdin_path is not None and proc.stdin_path not in self.files:
            return _missing_stdin
        return self.programs.get(proc.program, _unknown_program)

    def _interrupted(self, proc: FakeProcess, deadline: float) -> tuple[int, str | None] | None:
        if not self.running:
            raise ConnectError(Code.UNAVAILABLE, f"the connection to sandbox {self.sandbox_id} "
                                                 "ended before the stream completed")
        if proc.killed.is_set():
            return KILLED_EXIT_CODE, None
        if time.monotonic() >= deadline:
            raise ConnectError(Code.DEADLINE_EXCEEDED, "Request timed out")
        return None

    def _execute(self, proc: FakeProcess, deadline: float
                 ) -> Iterator[process_pb.StartResponse]:
        for step in self._script(proc)(proc):
            stop = self._interrupted(proc, deadline)
            if stop is not None:
                return stop
            match step:
                case Out(data=data):
                    yield _data("stdout", data)
                case Err(data=data):
                    yield _data("stderr", data)
                case Sleep(seconds=seconds):
                    until = min(time.monotonic() + seconds, deadline)
                    while not proc.wake.is_set() and (left := until - time.monotonic()) > 0:
                        proc.wake.wait(min(left, 3600.0))
                case Exit(code=code, error=error):
                    return code, error
                case Break(code=code, message=message):
                    raise ConnectError(code, message)
        return self._interrupted(proc, deadline) or (0, None)

    def signal(self, request: process_pb.SendSignalRequest) -> process_pb.SendSignalResponse:
        if not self.running:  # the proxy's 502, as connectrpc reports it
            raise ConnectError(Code.UNAVAILABLE, f"The sandbox {self.sandbox_id} was not found")
        if self.signal_failures:
            raise self.signal_failures.popleft()
        assert request.process is not None and request.process.selector is not None
        pid = request.process.selector.value
        self.signals.append((pid, request.signal))
        proc = next((p for p in self.processes if p.pid == pid and not p.ended.is_set()), None)
        if proc is None:
            raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
        if request.signal == process_pb.Signal.SIGKILL:
            proc.killed.set()
            proc.wake.set()
        return process_pb.SendSignalResponse()


# -- the control plane -----------------------------------------------------------------


class FakeSandboxPaginator(SandboxPaginator):
    """The SDK's paginator (its `has_next` bookkeeping) with the page fetched from the fake."""

    def __init__(self, cloud: FakeE2BCloud, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cloud = cloud

    def next_items(self, **opts: Any) -> list[SandboxInfo]:
        if not self.has_next:
            raise Exception("No more items to fetch")  # what the SDK raises
        items, token = self._cloud.api_list(self.query, self.limit, self._next_token,
                                            {**self._opts, **opts})
        self._update_pagination({"x-next-token": token} if token else {})
        return items


class FakeSandbox(e2b.Sandbox):
    """`e2b.Sandbox` with its control-plane HTTP calls answered by a `FakeE2BCloud`."""

    cloud: ClassVar[FakeE2BCloud]

    @classmethod
    def _create(cls, template: str | None, timeout: int | None,
                metadata: dict[str, str] | None, envs: dict[str, str] | None,
                allow_internet_access: bool | None, mcp: Any = None, network: Any = None,
                iam: Any = None, lifecycle: Any = None, volume_mounts: Any = None,
                logger: Any = None, idempotency_key: str | None = None,
                **opts: Any) -> FakeSandbox:
        return cls.cloud.api_create(
            cls, template=template, timeout=timeout, metadata=metadata, envs=envs,
            allow_internet_access=allow_internet_access, mcp=mcp, network=network, iam=iam,
            lifecycle=lifecycle, volume_mounts=volume_mounts, logger=logger,
            idempotency_key=idempotency_key, opts=opts,
        )

    @classmethod
    def _cls_kill(cls, sandbox_id: str, **opts: Any) -> bool:
        return cls.cloud.api_kill(sandbox_id, cls._resolve_api_params(**opts))

    @class_method_variant("_cls_kill")
    def kill(self, **opts: Any) -> bool:  # type: ignore[override]
        """The SDK's instance kill, which names `SandboxApi._cls_kill` and so needs repeating."""
        return type(self)._cls_kill(self.sandbox_id,
                                    **self.connection_config.get_api_params(**opts))

    @classmethod
    def list(cls, query: SandboxQuery | None = None, limit: int | None = None,
             next_token: str | None = None, order: Any = None,
             **opts: Any) -> SandboxPaginator:
        return FakeSandboxPaginator(cls.cloud, query=query, limit=limit, next_token=next_token,
                                    order=order, **cls._resolve_api_params(**opts))


class FakeE2BCloud:
    """E2B's API and its sandboxes. `Sandbox` is the class to give the product as `sdk=`."""

    def __init__(self, api_key: str = "e2b_test_key", *,
                 templates: Iterable[str] = ("mcp-gateway", "base"),
                 envd_version: str = "0.6.7", page_size: int = 100,
                 domain: str = "e2b.app") -> None:
        self.api_key = api_key
        self.templates = set(templates)
        self.envd_version = envd_version
        self.page_size = page_size
        self.domain = domain
        self.sandboxes: dict[str, FakeEnvd] = {}
        self.create_calls: list[dict[str, Any]] = []
        self.kill_calls: list[tuple[str, dict[str, Any]]] = []
        self.list_calls: list[dict[str, Any]] = []
        self.create_failures: deque[BaseException] = deque()
        self.kill_failures: deque[BaseException] = deque()
        self.list_failures: deque[BaseException] = deque()
        self.gateway_failure: tuple[int, str] | None = None
        self.gateway_502s: float = 0
        self.gateway_tools: list[str] | None = None
        """What tools/list answers (default: one tool per configured server)."""
        self.programs: dict[str, Script] = {"mcp-gateway": self._gateway}
        self.on_create: list[Callable[[FakeEnvd], None]] = []
        self._idempotency: dict[str, str] = {}
        self._lock = threading.Lock()
        self.Sandbox: type[FakeSandbox] = type("FakeSandbox", (FakeSandbox,), {"cloud": self})
        self.gateway_transport = httpx.MockTransport(self.handle_gateway)

    @property
    def created(self) -> list[FakeEnvd]:
        return list(self.sandboxes.values())

    @property
    def live(self) -> list[FakeEnvd]:
        return [s for s in self.sandboxes.values() if s.running]

    def _check_key(self, api_key: str | None) -> None:
        if api_key is None:  # what the SDK's ApiClient raises before any request
            raise e2b.AuthenticationException("API key is required")
        if api_key != self.api_key:
            raise api_exception_from_code(401, "Invalid API key")

    # -- POST /sandboxes ----------------------------------------------------------------
    def api_create(self, cls: type[FakeSandbox], *, template: str | None,
                   timeout: int | None, metadata: dict[str, str] | None,
                   envs: dict[str, str] | None, mcp: Any, logger: Any,
                   idempotency_key: str | None, opts: dict[str, Any],
                   **rest: Any) -> FakeSandbox:
        self.create_calls.append({"template": template, "timeout": timeout,
                                  "metadata": metadata, "envs": envs, "mcp": mcp,
                                  "idempotency_key": idempotency_key, **rest, **opts})
        params = cls._resolve_api_params(**opts)
        key = resolve_idempotency_key(idempotency_key)  # the SDK's own rule
        self._check_key(ConnectionConfig(**params).api_key)
        if self.create_failures:
            raise self.create_failures.popleft()
        template = template or cls.default_template
        if template not in self.templates:
            raise api_exception_from_code(404, f"template '{template}' not found")
        with self._lock:
            if key is not None and key in self._idempotency:  # a replay: the same sandbox
                envd = self.sandboxes[self._idempotency[key]]
            else:
                sandbox_id = "i" + uuid.uuid4().hex[:19]
                envd = FakeEnvd(self, sandbox_id, template=template, metadata=metadata or {},
                                envs=envs or {}, mcp=mcp, timeout=timeout)
                self.sandboxes[sandbox_id] = envd
                if key is not None:
                    self._idempotency[key] = sandbox_id
                for hook in self.on_create:
                    hook(envd)
        config = ConnectionConfig(
            extra_sandbox_headers={"X-Access-Token": envd.access_token,
                                   "E2b-Sandbox-Id": envd.sandbox_id,
                                   "E2b-Sandbox-Port": str(ConnectionConfig.envd_port)},
            logger=logger, **{**params, "api_url": UNREACHABLE_API_URL, "domain": self.domain},
        )
        client = cls(sandbox_id=envd.sandbox_id, sandbox_domain=None,
                     envd_version=Version(self.envd_version),
                     envd_access_token=envd.access_token, traffic_access_token=None,
                     connection_config=config)
        envd.attach(client)
        return client

    # -- DELETE /sandboxes/{id} ---------------------------------------------------------
    def api_kill(self, sandbox_id: str, opts: dict[str, Any]) -> bool:
        self.kill_calls.append((sandbox_id, dict(opts)))
        if self.kill_failures:
            raise self.kill_failures.popleft()
        self._check_key(opts.get("api_key"))
        envd = self.sandboxes.get(sandbox_id)
        if envd is None or not envd.running:
            return False  # the API's 404, which the SDK returns as False
        envd.shutdown()
        return True

    # -- GET /v2/sandboxes --------------------------------------------------------------
    def api_list(self, query: SandboxQuery | None, limit: int | None,
                 next_token: str | None, opts: dict[str, Any]
                 ) -> tuple[list[SandboxInfo], str | None]:
        self.list_calls.append({"query": query, "limit": limit, "next_token": next_token,
                                **opts})
        if self.list_failures:
            raise self.list_failures.popleft()
        self._check_key(opts.get("api_key"))
        wanted = (query.metadata if query else None) or {}
        matches = sorted((s for s in self.live
                          if all(s.metadata.get(k) == v for k, v in wanted.items())),
                         key=lambda s: s.started_at)
        start = int(next_token or 0)
        size = min(limit or self.page_size, self.page_size)
        page = matches[start:start + size]
        token = str(start + size) if start + size < len(matches) else None
        return [self._info(s) for s in page], token

    def _info(self, envd: FakeEnvd) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=envd.sandbox_id, sandbox_domain=None, template_id=envd.template,
            name=envd.template, metadata=dict(envd.metadata), started_at=envd.started_at,
            end_at=envd.started_at + timedelta(seconds=envd.timeout or 300),
            state=SandboxState.RUNNING, cpu_count=2, memory_mb=512,
            envd_version=self.envd_version,
        )

    # -- the MCP gateway inside the mcp-gateway template --------------------------------
    def _gateway(self, proc: FakeProcess) -> Iterator[Step]:
        """`mcp-gateway --config JSON`, as the SDK starts it: as root, token in the env."""
        config = json.loads(proc.arg("--config") or "null")
        if self.gateway_failure is not None:
            code, stderr = self.gateway_failure
            yield Err(stderr.encode())
            yield Exit(code)
            return
        envd = proc.sandbox
        envd.gateway_user = proc.user
        envd.gateway_config = config
        envd.gateway_token = proc.envs.get("GATEWAY_ACCESS_TOKEN")
        yield Out(f"mcp-gateway: {len(config or {})} server(s), listening on :{GATEWAY_PORT}\n"
                  .encode())

    def handle_gateway(self, request: httpx.Request) -> httpx.Response:
        """The gateway behind E2B's edge: the edge answers 502 while nothing listens on the
        port (and for a sandbox that is gone); then the gateway speaks MCP with its real
        checks (tests/fakes/mcp_gateway.py)."""
        prefix, _, rest = request.url.host.partition("-")
        sandbox_id = rest.split(".", 1)[0]
        envd = self.sandboxes.get(sandbox_id)
        if envd is None or not envd.running:
            return httpx.Response(502, json={"sandboxId": sandbox_id,
                                             "message": "The sandbox was not found",
                                             "code": 502})
        if prefix != str(GATEWAY_PORT) or request.url.path != "/mcp":
            return httpx.Response(404, text="not found")
        envd.gateway_requests += 1
        if envd.gateway_token is None or envd.gateway_requests <= self.gateway_502s:
            return edge_port_closed(sandbox_id, GATEWAY_PORT)
        if envd.mcp_gateway is None:
            tools = [f"{name.replace('/', '_')}_search" for name in envd.gateway_config or {}]
            envd.mcp_gateway = FakeMcpGateway(envd.gateway_token, tools=self.gateway_tools
                                              if self.gateway_tools is not None else tools)
        envd.mcp_gateway.token = envd.gateway_token
        return envd.mcp_gateway(request)
