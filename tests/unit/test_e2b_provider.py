"""The E2B provider against the real `e2b` SDK, with only E2B's network faked underneath.

`tests/fakes/e2b_sdk.py` keeps the SDK's own code in the loop (`Sandbox.create`, `Commands`,
`CommandHandle`, `Filesystem`, its error mapping), so these tests catch a provider that calls
the SDK with the wrong arguments, mistakes what it returns or raises, or translates an SDK
error into the wrong sandqueue error (retrying what cannot succeed, or giving up on what can).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

import e2b
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.api import api_exception_from_code
from e2b.envd.process import process_pb
from e2b.retry import resolve_idempotency_key

from sandqueue import errors
from sandqueue.contract import ErrorCategory
from sandqueue.settings import Settings
from tests.fakes.e2b_sdk import (
    HANG,
    KILLED_EXIT_CODE,
    Break,
    Err,
    Exit,
    FakeE2BCloud,
    FakeEnvd,
    FakeProcess,
    Out,
    Sleep,
    Step,
)
from worker.sandbox.base import SandboxSpec
from worker.sandbox.e2b import E2BProvider, E2BSandbox

API_KEY = "e2b_test_key"
MCP = {"exa": {"apiKey": "exa-resolved-secret"}}


@pytest.fixture
def cloud() -> FakeE2BCloud:
    return FakeE2BCloud(api_key=API_KEY, templates=("mcp-gateway", "base", "my-template",
                                                     "task-template"))


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"e2b_api_key": API_KEY, "anthropic_api_key": "sk-ant-test",
                                 "backoff_scale": 0}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def make_provider(cloud: FakeE2BCloud, settings: Settings | None = None,
                  handler: Callable[[httpx.Request], httpx.Response] | None = None
                  ) -> E2BProvider:
    transport = httpx.MockTransport(handler) if handler else cloud.gateway_transport
    return E2BProvider(settings or make_settings(), http=httpx.Client(transport=transport),
                       sdk=cloud.Sandbox)


def make_spec(**overrides: object) -> SandboxSpec:
    values: dict[str, object] = {
        "task_id": str(uuid.uuid4()), "attempt": 1, "lifetime_s": 900,
        "deadline_at": time.time() + 600, "mcp": dict(MCP),
        "envs": {"ANTHROPIC_API_KEY": "sk-ant-test", "TASK_VAR": "v"},
        "labels": {"team": "search"}, "request_timeout_s": 30.0,
    }
    values.update(overrides)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def only(cloud: FakeE2BCloud) -> FakeEnvd:
    assert len(cloud.created) == 1, cloud.created
    return cloud.created[0]


def program(envd: FakeEnvd, name: str, steps: Callable[[FakeProcess], Iterator[Step]]) -> None:
    envd.programs[name] = steps


class Collector:
    """The callbacks the agent adapter passes to `start`, recording chunks as they come."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.err: list[str] = []

    def stdout(self, chunk: str) -> None:
        self.out.append(chunk)

    def stderr(self, chunk: str) -> None:
        self.err.append(chunk)


# -- the fake itself ------------------------------------------------------------------------


def test_the_fake_keeps_the_sdks_command_semantics(cloud: FakeE2BCloud) -> None:
    """Guards the fake against SDK upgrades: these are the SDK's behaviours the provider uses."""
    sbx = cloud.Sandbox.create(template="base", api_key=API_KEY)
    assert isinstance(sbx, e2b.Sandbox)

    def exits(proc: FakeProcess) -> Iterator[Step]:
        yield Out(b"out")
        yield Err(b"err")
        yield Exit(int(proc.argv[1]))

    program(only(cloud), "exits", exits)
    program(only(cloud), "hangs", lambda proc: iter([HANG]))
    assert sbx.commands.run("exits 0").exit_code == 0
    with pytest.raises(e2b.CommandExitException) as info:
        sbx.commands.run("exits 4")
    assert (info.value.exit_code, info.value.stdout, info.value.stderr) == (4, "out", "err")
    with pytest.raises(e2b.TimeoutException):
        sbx.commands.run("hangs", timeout=0.05)
    handle = sbx.commands.run("hangs", background=True, retain_output=False)
    assert isinstance(handle, e2b.CommandHandle)
    assert handle.kill() is True
    with pytest.raises(e2b.CommandExitException) as killed:
        handle.wait()
    assert killed.value.exit_code == KILLED_EXIT_CODE and killed.value.stdout is None
    assert handle.kill() is False  # already gone: the SDK's NOT_FOUND -> False
    assert sbx.kill() is True
    assert sbx.kill() is False


# -- creating a sandbox --------------------------------------------------------------------


def test_create_passes_what_the_task_needs_to_the_sdk(cloud: FakeE2BCloud) -> None:
    """Template, lifetime, metadata (for the reaper), envs, MCP, idempotency and key reach E2B."""
    spec = make_spec(attempt=2, lifetime_s=777)
    sandbox = make_provider(cloud, make_settings(e2b_request_timeout_s=45)).create(spec)

    call = cloud.create_calls[0]
    assert call["template"] == "mcp-gateway" == e2b.Sandbox.default_mcp_template
    assert call["timeout"] == 777
    assert call["metadata"] == spec.metadata()
    assert call["metadata"]["sandqueue"] == "1"
    assert call["metadata"]["sandqueue_task_id"] == spec.task_id
    assert call["metadata"]["sandqueue_attempt"] == "2"
    assert call["metadata"]["label_team"] == "search"
    assert call["envs"]["ANTHROPIC_API_KEY"] == "sk-ant-test"
    assert call["envs"]["TASK_VAR"] == "v"
    assert call["mcp"] == MCP
    assert call["api_key"] == API_KEY
    assert call["request_timeout"] == 30.0  # the spec's, being below the setting's 45
    assert resolve_idempotency_key(call["idempotency_key"]) == call["idempotency_key"]

    envd = only(cloud)
    assert sandbox.sandbox_id == envd.sandbox_id
    assert envd.envs["ANTHROPIC_API_KEY"] == "sk-ant-test"
    assert sandbox.mcp_url() == envd.gateway_url
    assert sandbox.simulated is False


def test_the_sdk_starts_the_gateway_with_the_token_the_provider_reports(
        cloud: FakeE2BCloud) -> None:
    """The token written into Claude Code's MCP config must be the one the gateway checks."""
    sandbox = make_provider(cloud).create(make_spec())
    envd = only(cloud)
    (gateway,) = envd.processes_of("mcp-gateway")
    assert gateway.user == "root"
    assert envd.gateway_config == MCP
    assert envd.gateway_token and sandbox.mcp_token() == envd.gateway_token


def test_no_mcp_servers_means_no_gateway_but_the_same_template(cloud: FakeE2BCloud) -> None:
    """`mcp=None` keeps the SDK from starting a gateway that would have nothing to serve."""
    make_provider(cloud).create(make_spec(mcp={}))
    assert cloud.create_calls[0]["mcp"] is None
    assert cloud.create_calls[0]["template"] == "mcp-gateway"
    assert only(cloud).processes_of("mcp-gateway") == []


@pytest.mark.parametrize(("task_template", "setting", "expected"), [
    (None, None, "mcp-gateway"),
    (None, "my-template", "my-template"),
    ("task-template", "my-template", "task-template"),
])
def test_template_precedence(cloud: FakeE2BCloud, task_template: str | None,
                             setting: str | None, expected: str) -> None:
    """A task's template beats the deployment's, which beats the SDK's MCP template."""
    make_provider(cloud, make_settings(template=setting)).create(
        make_spec(template=task_template))
    assert cloud.create_calls[0]["template"] == expected


@pytest.mark.parametrize("task_id", [
    "3f2b8c1e-7a4d-4e8f-9b0a-1c2d3e4f5a6b",
    "Task_ÄBC 1/2:weird",
    "x" * 400,
    "---",
])
def test_idempotency_key_satisfies_the_sdk_rule(cloud: FakeE2BCloud, task_id: str) -> None:
    """The SDK refuses keys outside 1-255 of [a-z0-9-] with InvalidArgumentException."""
    make_provider(cloud).create(make_spec(task_id=task_id))
    key = cloud.create_calls[0]["idempotency_key"]
    assert re.fullmatch(r"[a-z0-9-]{1,255}", key), key


@pytest.mark.parametrize(("first", "second"), [
    (("0d6f3a52-task", 1), ("0d6f3a52-task", 2)),
    (("Task_A", 1), ("task-a", 1)),
    (("t" * 300, 1), ("t" * 300, 2)),
], ids=["attempts", "case-and-punctuation", "long-task-id"])
def test_each_task_attempt_gets_its_own_sandbox(cloud: FakeE2BCloud,
                                                first: tuple[str, int],
                                                second: tuple[str, int]) -> None:
    """E2B answers a repeated idempotency key with the sandbox it created for it.

    So two different (task, attempt) pairs must never share a key, or a retry (or another
    task) is handed a sandbox that was already killed or is running someone else's agent.
    """
    provider = make_provider(cloud)
    a = provider.create(make_spec(task_id=first[0], attempt=first[1]))
    b = provider.create(make_spec(task_id=second[0], attempt=second[1]))
    keys = [c["idempotency_key"] for c in cloud.create_calls]
    assert keys[0] != keys[1], keys
    assert a.sandbox_id != b.sandbox_id


def test_provider_refuses_to_start_without_an_e2b_key() -> None:
    """A worker without E2B_API_KEY must say so at start, not fail every task later."""
    with pytest.raises(errors.ConfigError, match="E2B_API_KEY"):
        E2BProvider(make_settings(e2b_api_key=None))


# -- translating SDK errors ---------------------------------------------------------------

Case = tuple[Callable[[], BaseException], type[errors.SandqueueError], ErrorCategory, bool,
             str | None]

CREATE_ERRORS: dict[str, Case] = {
    "auth": (lambda: api_exception_from_code(401, "Invalid API key"),
             errors.AuthError, ErrorCategory.AUTH, False, "E2B_API_KEY"),
    "rate_limit": (lambda: api_exception_from_code(429, "too many sandboxes"),
                   errors.RateLimited, ErrorCategory.RATE_LIMITED, True, None),
    "busy_503": (lambda: api_exception_from_code(503, "no capacity"),
                 errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
    "server_500": (lambda: api_exception_from_code(500, "internal error"),
                   errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
    "template_404": (lambda: api_exception_from_code(404, "template 'nope' not found"),
                     errors.InvalidTask, ErrorCategory.INVALID_TASK, False, "template"),
    "bad_request_400": (lambda: api_exception_from_code(400, "timeout too long"),
                        errors.InvalidTask, ErrorCategory.INVALID_TASK, False, None),
    "forbidden_403": (lambda: api_exception_from_code(403, "team blocked"),
                      errors.AuthError, ErrorCategory.AUTH, False, "E2B_API_KEY"),
    "timeout": (lambda: e2b.TimeoutException("Request timed out"),
                errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
    "not_running": (lambda: e2b.SandboxNotRunningException("sandbox was not found"),
                    errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
    "unreachable": (lambda: e2b.SandboxUnreachableException("port is not open"),
                    errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
    "not_found": (lambda: e2b.NotFoundException("template not found"),
                  errors.InvalidTask, ErrorCategory.INVALID_TASK, False, "template"),
    "invalid_argument": (lambda: e2b.InvalidArgumentException("bad metadata"),
                         errors.InvalidTask, ErrorCategory.INVALID_TASK, False, None),
    "transport": (lambda: httpx.ConnectError("connection refused"),
                  errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
    "unexpected": (lambda: RuntimeError("Body of the request is None"),
                   errors.SandboxUnavailable, ErrorCategory.SANDBOX_UNAVAILABLE, True, None),
}


def test_service_busy_is_not_a_sandbox_exception() -> None:
    """Why the translation needs its own case for it: a catch-all would miss the 503."""
    assert not isinstance(api_exception_from_code(503, "x"), e2b.SandboxException)
    assert isinstance(api_exception_from_code(503, "x"), e2b.ServiceBusyException)


@pytest.mark.parametrize("case", list(CREATE_ERRORS.values()), ids=list(CREATE_ERRORS))
def test_create_errors_are_translated(cloud: FakeE2BCloud, case: Case) -> None:
    """Each SDK error becomes the sandqueue error whose retry flag and advice fit it."""
    make_exc, kind, category, retryable, hint = case
    injected = make_exc()
    cloud.create_failures.append(injected)
    with pytest.raises(errors.SandqueueError) as info:
        make_provider(cloud).create(make_spec())
    err = info.value
    assert type(err) is kind
    assert err.category is category
    assert err.retryable is retryable
    assert err.__cause__ is injected
    assert "creating the sandbox" in err.message
    if hint:
        assert hint in err.message
    assert cloud.live == []


def test_a_wrong_api_key_is_an_auth_error_naming_the_setting(cloud: FakeE2BCloud) -> None:
    """The SDK's own 401 mapping, end to end: permanent, and says which key to fix."""
    with pytest.raises(errors.AuthError, match="E2B_API_KEY") as info:
        make_provider(cloud, make_settings(e2b_api_key="e2b_wrong")).create(make_spec())
    assert isinstance(info.value.__cause__, e2b.AuthenticationException)
    assert cloud.created == []


def test_an_unknown_template_is_an_invalid_task(cloud: FakeE2BCloud) -> None:
    """E2B answers 404 for a template it does not know; retrying cannot fix that."""
    with pytest.raises(errors.InvalidTask):
        make_provider(cloud).create(make_spec(template="no-such-template"))


def test_gateway_start_failure_is_an_mcp_config_error_and_the_sdk_kills_the_sandbox(
        cloud: FakeE2BCloud) -> None:
    """A gateway that exits non-zero almost always means a bad server config: not retried."""
    cloud.gateway_failure = (1, "error: server exa: apiKey is invalid\n")
    with pytest.raises(errors.McpConfigError) as info:
        make_provider(cloud).create(make_spec())
    err = info.value
    assert err.category is ErrorCategory.MCP_CONFIG and not err.retryable
    assert "apiKey is invalid" in err.message
    cause = err.__cause__
    assert isinstance(cause, e2b.SandboxException)
    assert str(cause).startswith("Failed to start MCP gateway")
    assert isinstance(cause.__cause__, e2b.CommandExitException)
    envd = only(cloud)
    assert [sid for sid, _ in cloud.kill_calls] == [envd.sandbox_id]
    assert not envd.running


# -- files ----------------------------------------------------------------------------------


def test_write_file_is_byte_exact_and_owned_by_the_sandbox_user(cloud: FakeE2BCloud) -> None:
    """The prompt file must reach the sandbox unaltered, readable by the non-root agent."""
    sandbox = make_provider(cloud, make_settings(sandbox_user="agent")).create(make_spec())
    blob = bytes(range(256)) + "\r\n naïve 日本語 🎉 $(x) `y` 'z' \"w\"".encode()
    sandbox.write_file("/home/user/.sandqueue/prompt.txt", blob)
    sandbox.write_file("/home/user/.sandqueue/mcp.json", '{"ü": "\\n"}')
    envd = only(cloud)
    assert envd.files["/home/user/.sandqueue/prompt.txt"] == blob
    assert envd.files["/home/user/.sandqueue/mcp.json"] == '{"ü": "\\n"}'.encode()
    assert envd.file_owners["/home/user/.sandqueue/prompt.txt"] == "agent"


def gone(envd: FakeEnvd) -> httpx.Response:
    return httpx.Response(502, json={"message": f"The sandbox {envd.sandbox_id} was not found"})


WRITE_ERRORS: dict[str, tuple[Callable[[FakeEnvd], httpx.Response | Exception],
                              type[errors.SandqueueError]]] = {
    "rate_limit_429": (lambda e: httpx.Response(429, json={"message": "slow down"}),
                       errors.RateLimited),
    "sandbox_gone_502": (gone, errors.SandboxUnavailable),
    "disk_full_507": (lambda e: httpx.Response(507, json={"message": "no space"}),
                      errors.SandboxUnavailable),
    "refused_401": (lambda e: httpx.Response(401, json={"message": "bad token"}),
                    errors.AuthError),
    "bad_path_400": (lambda e: httpx.Response(400, json={"message": "invalid path"}),
                     errors.InvalidTask),
    "connection_dropped": (lambda e: httpx.ReadError("connection reset"),
                           errors.SandboxUnavailable),
}


@pytest.mark.parametrize("case", list(WRITE_ERRORS.values()), ids=list(WRITE_ERRORS))
def test_write_file_errors_are_translated(cloud: FakeE2BCloud, case: tuple) -> None:
    """envd's HTTP answers pass through the SDK's mapping, then the provider's."""
    failure, kind = case
    sandbox = make_provider(cloud).create(make_spec())
    only(cloud).write_failures.append(failure(only(cloud)))
    with pytest.raises(errors.SandqueueError) as info:
        sandbox.write_file("/home/user/x.txt", b"data")
    assert type(info.value) is kind
    assert "writing /home/user/x.txt" in info.value.message


def test_write_to_a_killed_sandbox_is_sandbox_unavailable(cloud: FakeE2BCloud) -> None:
    """E2B may reap a sandbox at any time; that is transient for the task, not a bug."""
    provider = make_provider(cloud)
    sandbox = provider.create(make_spec())
    assert provider.kill(sandbox.sandbox_id) is True
    with pytest.raises(errors.SandboxUnavailable) as info:
        sandbox.write_file("/home/user/x.txt", b"data")
    assert isinstance(info.value.__cause__, e2b.SandboxNotRunningException)


# -- commands -------------------------------------------------------------------------------


def test_start_streams_decoded_chunks_and_returns_a_nonzero_exit(cloud: FakeE2BCloud) -> None:
    """Multi-byte characters split across chunks arrive whole; exit 3 is returned, not raised."""
    sandbox = make_provider(cloud).create(make_spec())
    text = "naïve 日本語 🎉 done\n"
    raw = text.encode()

    def emit(proc: FakeProcess) -> Iterator[Step]:
        for i in range(len(raw)):  # one byte per envd event
            yield Out(raw[i:i + 1])
        yield Err("warn: ✓\n".encode()[:7])
        yield Err("warn: ✓\n".encode()[7:])
        yield Exit(3)

    program(only(cloud), "agent", emit)
    seen = Collector()
    cmd = sandbox.start("agent --flag", on_stdout=seen.stdout, on_stderr=seen.stderr,
                        timeout_s=30)
    assert cmd.wait() == 3
    assert "".join(seen.out) == text
    assert "\ufffd" not in "".join(seen.out)
    assert "".join(seen.err) == "warn: ✓\n"


def test_start_runs_as_the_sandbox_user_with_the_sandbox_env_and_timeout(
        cloud: FakeE2BCloud) -> None:
    """Claude Code refuses --dangerously-skip-permissions as root; the stream needs a bound."""
    sandbox = make_provider(cloud, make_settings(sandbox_user="agent")).create(make_spec())

    def ok(proc: FakeProcess) -> Iterator[Step]:
        yield Out(b"ok\n")

    program(only(cloud), "agent", ok)
    seen = Collector()
    cmd = sandbox.start("agent -p", on_stdout=seen.stdout, on_stderr=seen.stderr,
                        timeout_s=42)
    assert cmd.wait() == 0
    (proc,) = only(cloud).processes_of("agent")
    assert proc.user == "agent"
    assert proc.envs["ANTHROPIC_API_KEY"] == "sk-ant-test"
    assert proc.timeout_ms == 42_000
    assert seen.out == ["ok\n"]


def test_a_stream_broken_midway_is_sandbox_unavailable(cloud: FakeE2BCloud) -> None:
    """The output so far is delivered; then a dropped stream is a retryable sandbox error."""
    sandbox = make_provider(cloud).create(make_spec())

    def dies(proc: FakeProcess) -> Iterator[Step]:
        yield Out(b'{"type":"system"}\n')
        yield Break(Code.UNAVAILABLE, "connection to the sandbox ended before the stream "
                                      "completed")

    program(only(cloud), "agent", dies)
    seen = Collector()
    cmd = sandbox.start("agent", on_stdout=seen.stdout, on_stderr=seen.stderr, timeout_s=30)
    with pytest.raises(errors.SandboxUnavailable) as info:
        cmd.wait()
    assert info.value.retryable
    assert isinstance(info.value.__cause__, e2b.SandboxUnreachableException)
    assert seen.out == ['{"type":"system"}\n']


def test_a_sandbox_killed_under_a_running_command_is_sandbox_unavailable(
        cloud: FakeE2BCloud) -> None:
    """E2B reaping the sandbox (its timeout) mid-run: the SDK's probe says it is gone."""
    provider = make_provider(cloud)
    sandbox = provider.create(make_spec())
    program(only(cloud), "agent", lambda proc: iter([Out(b"working\n"), HANG]))
    seen = Collector()
    cmd = sandbox.start("agent", on_stdout=seen.stdout, on_stderr=seen.stderr, timeout_s=30)
    threading.Timer(0.05, provider.kill, args=(sandbox.sandbox_id,)).start()
    with pytest.raises(errors.SandboxUnavailable) as info:
        cmd.wait()
    assert isinstance(info.value.__cause__, e2b.SandboxNotRunningException)


def test_a_stream_outliving_its_timeout_is_sandbox_unavailable(cloud: FakeE2BCloud) -> None:
    """The start timeout is the last line of defence if the watchdog could not kill."""
    sandbox = make_provider(cloud).create(make_spec())
    program(only(cloud), "agent", lambda proc: iter([HANG]))
    seen = Collector()
    cmd = sandbox.start("agent", on_stdout=seen.stdout, on_stderr=seen.stderr, timeout_s=0.1)
    with pytest.raises(errors.SandboxUnavailable) as info:
        cmd.wait()
    assert isinstance(info.value.__cause__, e2b.TimeoutException)


START_ERRORS: dict[str, tuple[Callable[[], ConnectError], type[errors.SandqueueError]]] = {
    "rate_limited": (lambda: ConnectError(Code.RESOURCE_EXHAUSTED, "too many processes"),
                     errors.RateLimited),
    "unauthenticated": (lambda: ConnectError(Code.UNAUTHENTICATED, "bad access token"),
                        errors.AuthError),
    "sandbox_gone": (lambda: ConnectError(Code.UNAVAILABLE, "sandbox was not found"),
                     errors.SandboxUnavailable),
    "internal": (lambda: ConnectError(Code.INTERNAL, "envd crashed"),
                 errors.SandboxUnavailable),
    "invalid_argument": (lambda: ConnectError(Code.INVALID_ARGUMENT, "bad user"),
                         errors.InvalidTask),
}


@pytest.mark.parametrize("case", list(START_ERRORS.values()), ids=list(START_ERRORS))
def test_start_errors_are_translated(cloud: FakeE2BCloud, case: tuple) -> None:
    """envd refusing to start the agent goes through the SDK's RPC mapping, then ours."""
    make_error, kind = case
    sandbox = make_provider(cloud).create(make_spec())
    only(cloud).start_failures.append(make_error())
    with pytest.raises(errors.SandqueueError) as info:
        sandbox.start("agent", on_stdout=print, on_stderr=print, timeout_s=5)
    assert type(info.value) is kind
    assert "starting the agent" in info.value.message


def test_killing_a_hung_command_ends_wait_promptly(cloud: FakeE2BCloud) -> None:
    """The watchdog's only lever: SIGKILL through the handle, after which wait returns."""
    sandbox = make_provider(cloud).create(make_spec())
    program(only(cloud), "agent", lambda proc: iter([Out(b"start\n"), HANG]))
    seen = Collector()
    cmd = sandbox.start("agent", on_stdout=seen.stdout, on_stderr=seen.stderr, timeout_s=30)
    threading.Timer(0.05, cmd.kill).start()
    t0 = time.monotonic()
    assert cmd.wait() == KILLED_EXIT_CODE
    assert time.monotonic() - t0 < 2
    (proc,) = only(cloud).processes_of("agent")
    assert only(cloud).signals == [(proc.pid, process_pb.Signal.SIGKILL)]


def test_killing_a_command_never_raises(cloud: FakeE2BCloud,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Kill runs in the watchdog thread: an exception there would leave the run hanging."""
    provider = make_provider(cloud)
    sandbox = provider.create(make_spec())
    program(only(cloud), "quick", lambda proc: iter([Exit(0)]))
    seen = Collector()
    cmd = sandbox.start("quick", on_stdout=seen.stdout, on_stderr=seen.stderr, timeout_s=5)
    assert cmd.wait() == 0
    cmd.kill()  # already ended: the SDK answers False
    program(only(cloud), "agent", lambda proc: iter([HANG]))
    hung = sandbox.start("agent", on_stdout=seen.stdout, on_stderr=seen.stderr, timeout_s=5)
    only(cloud).signal_failures.append(ConnectError(Code.INTERNAL, "envd busy"))
    with caplog.at_level(logging.WARNING, logger="worker.sandbox.e2b"):
        hung.kill()
    assert "could not kill command" in caplog.text
    provider.kill(sandbox.sandbox_id)
    hung.kill()  # sandbox gone: SandboxNotRunningException inside, swallowed
    with pytest.raises(errors.SandboxUnavailable):
        hung.wait()


def test_run_returns_output_and_exit_codes_instead_of_raising(cloud: FakeE2BCloud) -> None:
    """The SDK raises CommandExitException for a non-zero exit; `run` returns it as a value."""
    sandbox = make_provider(cloud, make_settings(sandbox_user="agent")).create(make_spec())

    def check(proc: FakeProcess) -> Iterator[Step]:
        yield Out(b"claude 2.0.0\n")
        yield Err(b"deprecated\n")
        yield Exit(int(proc.argv[1]))

    program(only(cloud), "check", check)
    ok = sandbox.run("check 0", timeout_s=5)
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, "claude 2.0.0\n", "deprecated\n")
    bad = sandbox.run("check 2", timeout_s=5)
    assert (bad.exit_code, bad.stdout, bad.stderr) == (2, "claude 2.0.0\n", "deprecated\n")
    missing = sandbox.run("nosuch --version", timeout_s=5)
    assert missing.exit_code == 127 and "command not found" in missing.stderr
    assert {p.user for p in only(cloud).processes if p.program != "mcp-gateway"} == {"agent"}


def test_run_past_its_timeout_is_sandbox_unavailable(cloud: FakeE2BCloud) -> None:
    """A short command that hangs must not hang the worker thread."""
    sandbox = make_provider(cloud).create(make_spec())
    program(only(cloud), "slow", lambda proc: iter([Sleep(30)]))
    t0 = time.monotonic()
    with pytest.raises(errors.SandboxUnavailable) as info:
        sandbox.run("slow", timeout_s=0.1)
    assert time.monotonic() - t0 < 2
    assert isinstance(info.value.__cause__, e2b.TimeoutException)


# -- killing sandboxes ----------------------------------------------------------------------


def test_sandbox_kill_is_idempotent(cloud: FakeE2BCloud) -> None:
    """The session's `finally` and a reaper may both kill; E2B is asked once."""
    sandbox = make_provider(cloud).create(make_spec())
    sandbox.kill()
    sandbox.kill()
    assert [sid for sid, _ in cloud.kill_calls] == [sandbox.sandbox_id]
    assert cloud.kill_calls[0][1]["api_key"] == API_KEY
    assert cloud.live == []


@pytest.mark.parametrize("failure", [
    lambda: e2b.ServiceBusyException("503: busy"),
    lambda: api_exception_from_code(500, "boom"),
    lambda: e2b.TimeoutException("Request timed out"),
    lambda: httpx.ConnectError("refused"),
], ids=["busy", "500", "timeout", "transport"])
def test_sandbox_kill_never_raises_and_retries_after_a_failure(
        cloud: FakeE2BCloud, caplog: pytest.LogCaptureFixture,
        failure: Callable[[], BaseException]) -> None:
    """A failed kill is logged (the sandbox still dies at its timeout) and tried again."""
    sandbox = make_provider(cloud).create(make_spec())
    cloud.kill_failures.append(failure())
    with caplog.at_level(logging.ERROR, logger="worker.sandbox.e2b"):
        sandbox.kill()
    assert f"could not kill sandbox {sandbox.sandbox_id}" in caplog.text
    assert cloud.live != []
    sandbox.kill()
    assert cloud.live == []
    assert len(cloud.kill_calls) == 2


def test_kill_by_id_reports_whether_it_was_alive(cloud: FakeE2BCloud) -> None:
    """The reaper kills by id with the configured key and request timeout."""
    provider = make_provider(cloud, make_settings(e2b_request_timeout_s=12))
    sandbox = provider.create(make_spec())
    assert provider.kill(sandbox.sandbox_id) is True
    assert provider.kill(sandbox.sandbox_id) is False
    assert provider.kill("inosuchsandbox000000") is False
    assert all(opts["api_key"] == API_KEY and opts["request_timeout"] == 12
               for _, opts in cloud.kill_calls)


def test_kill_by_id_errors_are_translated(cloud: FakeE2BCloud) -> None:
    """Unlike a sandbox's own kill, the reaper wants to know that a kill failed."""
    cloud.kill_failures.append(e2b.ServiceBusyException("503: busy"))
    with pytest.raises(errors.SandboxUnavailable, match="killing sandbox sbx-1"):
        make_provider(cloud).kill("sbx-1")


# -- listing ---------------------------------------------------------------------------------


def test_list_live_finds_only_sandqueue_sandboxes_across_pages(cloud: FakeE2BCloud) -> None:
    """The reaper sees every page, and never another application's sandboxes."""
    cloud.page_size = 2
    provider = make_provider(cloud)
    ours = [provider.create(make_spec(task_id=f"task-{i}")) for i in range(5)]
    foreign = cloud.Sandbox.create(template="base", metadata={"app": "other"},
                                   api_key=API_KEY)
    found = provider.list_live()
    assert sorted(s.sandbox_id for s in found) == sorted(s.sandbox_id for s in ours)
    assert foreign.sandbox_id not in {s.sandbox_id for s in found}
    assert all(s.metadata["sandqueue"] == "1" for s in found)
    assert {s.metadata["sandqueue_task_id"] for s in found} == {f"task-{i}" for i in range(5)}
    assert all(isinstance(s.started_at, datetime) for s in found)
    assert len(cloud.list_calls) == 3
    assert all(c["query"].metadata == {"sandqueue": "1"} and c["api_key"] == API_KEY
               for c in cloud.list_calls)


def test_list_live_skips_killed_sandboxes(cloud: FakeE2BCloud) -> None:
    provider = make_provider(cloud)
    a = provider.create(make_spec())
    b = provider.create(make_spec())
    a.kill()
    assert [s.sandbox_id for s in provider.list_live()] == [b.sandbox_id]


def test_list_live_errors_are_translated(cloud: FakeE2BCloud) -> None:
    cloud.list_failures.append(api_exception_from_code(401, "Invalid API key"))
    with pytest.raises(errors.AuthError, match="E2B_API_KEY"):
        make_provider(cloud).list_live()


# -- the MCP gateway's readiness -----------------------------------------------------------


def gateway_sandbox(cloud: FakeE2BCloud,
                    handler: Callable[[httpx.Request], httpx.Response] | None = None
                    ) -> E2BSandbox:
    sandbox = make_provider(cloud, handler=handler).create(make_spec())
    assert isinstance(sandbox, E2BSandbox)
    return sandbox


def test_gateway_ready_speaks_mcp_with_the_bearer_token(cloud: FakeE2BCloud) -> None:
    """The preflight reaches the gateway exactly as Claude Code will: same URL, same token,
    an MCP session (initialize, initialized, tools/list), and reports its tools."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return cloud.handle_gateway(request)

    sandbox = gateway_sandbox(cloud, handler)
    assert sandbox.wait_gateway_ready(5, ["exa"]) == ["exa_search"]
    assert [json.loads(r.content)["method"] for r in seen] == [
        "initialize", "notifications/initialized", "tools/list"]
    for request in seen:
        assert request.method == "POST"
        assert str(request.url) == sandbox.mcp_url()
        assert request.headers["authorization"] == f"Bearer {only(cloud).gateway_token}"


def test_gateway_ready_after_502s(cloud: FakeE2BCloud) -> None:
    """E2B's edge answers 502 until the gateway listens: keep polling, then go."""
    cloud.gateway_502s = 1
    sandbox = gateway_sandbox(cloud)
    t0 = time.monotonic()
    sandbox.wait_gateway_ready(5, ["notion"])
    assert time.monotonic() - t0 < 2
    assert only(cloud).gateway_requests == 4  # one 502, then the three MCP requests


def test_gateway_that_never_answers_times_out(cloud: FakeE2BCloud) -> None:
    """Bounded by the timeout, retryable, and names the setting to raise."""
    cloud.gateway_502s = float("inf")
    sandbox = gateway_sandbox(cloud)
    t0 = time.monotonic()
    with pytest.raises(errors.GatewayTimeout) as info:
        sandbox.wait_gateway_ready(0.3, ["notion"])
    assert time.monotonic() - t0 < 2
    assert info.value.retryable
    assert "HTTP 502" in info.value.message and "port is not open" in info.value.message
    assert "SANDQUEUE_GATEWAY_READY_TIMEOUT_S" in info.value.message


def test_a_gateway_whose_tools_list_stays_empty_ends_gateway_timeout(cloud: FakeE2BCloud
                                                                      ) -> None:
    cloud.gateway_tools = []
    with pytest.raises(errors.GatewayTimeout) as info:
        gateway_sandbox(cloud).wait_gateway_ready(0.5, ["notion"])
    assert "notion" in info.value.message and "no tools" in info.value.message


def test_gateway_refusing_the_token_is_a_permanent_auth_error(cloud: FakeE2BCloud) -> None:
    """Waiting cannot fix a refused token; one request and out, not retried."""
    sandbox = gateway_sandbox(cloud)
    only(cloud).gateway_token = "a-different-token"
    with pytest.raises(errors.AuthError, match="401") as info:
        sandbox.wait_gateway_ready(5, ["notion"])
    assert not info.value.retryable
    assert only(cloud).gateway_requests == 1
    assert info.value.retryable is False


def test_gateway_forbidden_fails_at_once(cloud: FakeE2BCloud) -> None:
    calls: list[int] = []

    def forbidden(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(403)

    with pytest.raises(errors.AuthError, match="403"):
        gateway_sandbox(cloud, forbidden).wait_gateway_ready(5, ["notion"])
    assert len(calls) == 1


def test_gateway_connection_errors_are_retried_then_time_out(cloud: FakeE2BCloud) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(errors.GatewayTimeout, match="ConnectError"):
        gateway_sandbox(cloud, refused).wait_gateway_ready(0.3, ["notion"])


def test_gateway_ready_after_a_connection_error(cloud: FakeE2BCloud) -> None:
    attempts: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.ReadTimeout("timed out", request=request)
        return cloud.handle_gateway(request)

    gateway_sandbox(cloud, flaky).wait_gateway_ready(5, ["notion"])
    assert len(attempts) == 4


@pytest.mark.parametrize("status", [200, 202, 400, 404, 406, 409])
def test_an_answer_that_is_not_an_mcp_session_is_not_ready(cloud: FakeE2BCloud,
                                                           status: int) -> None:
    """The first version took any answer below 500 for ready; an edge 409 (a paused sandbox
    resuming) or a bare 200 is not a gateway that lists tools."""
    with pytest.raises(errors.GatewayTimeout):
        gateway_sandbox(cloud, lambda r: httpx.Response(status)).wait_gateway_ready(
            0.3, ["notion"])


def test_a_sandbox_made_close_to_the_deadline_is_still_killed_with_the_full_timeout(
        cloud: FakeE2BCloud) -> None:
    """The create request is bounded by the time left (spec.request_timeout_s), but the SDK
    keeps that request_timeout for every later control-plane call of the sandbox object
    (e2b/connection_config.py `get_api_params`): the kill, which stops the billing, must
    not inherit a 1-second budget."""
    provider = make_provider(cloud, make_settings(e2b_request_timeout_s=20))
    sandbox = provider.create(make_spec(mcp={}, request_timeout_s=1.0))
    assert cloud.create_calls[-1]["request_timeout"] == 1.0
    sandbox.kill()
    ((_, opts),) = cloud.kill_calls
    assert opts["request_timeout"] == 20
    assert cloud.live == []
