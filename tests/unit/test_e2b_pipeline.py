"""The whole pipeline on the E2B provider, with the real `e2b` SDK over a fake E2B cloud.

The fake `claude` inside the sandbox behaves like the CLI as the adapter sees it: it reads
its prompt on stdin, checks its flags and its MCP config, and prints stream-json (init event,
tool calls, result) in chunks split at random byte offsets, mixed with non-JSON noise. The
MCP gateway shows as connected only if the config the worker wrote names the gateway's real
URL and the token the SDK started it with, so a wrong config fails here as it would live.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b.api import api_exception_from_code
from e2b.envd.process import process_pb

from sandqueue.contract import AgentResult, AgentTask, RetryPolicy, TaskMessage, TaskStatus
from sandqueue.settings import Settings
from tests.fakes.e2b_sdk import HANG, Err, Exit, FakeE2BCloud, FakeEnvd, FakeProcess, Step, chunked
from worker.agent.claude_code import GATEWAY_NAME, MCP_CONFIG_PATH, PROMPT_PATH, ClaudeCodeAgent
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.pipeline import Pipeline, TaskContext
from worker.sandbox.e2b import E2BProvider

E2B_KEY = "e2b_test_key"
ANTHROPIC_KEY = "sk-ant-test"
EXA_SECRET = "exa-secret-9f8e7d6c5b4a"
MCP = {"exa": {"apiKey": "${EXA_API_KEY}"}}
BUILTIN_TOOLS = ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch"]
NOISE = "npm WARN config production Use `--omit=dev` instead.\n\n[claude] starting\n"
SUCCESS_COST = 0.0123
ERROR_COST = 0.001


class FakeClaude:
    """`claude -p --output-format stream-json --verbose ...` as the adapter can observe it.

    `behaviours` says what each successive run does (the last one repeats): ok, leak, hang,
    silent, gateway_failed, no_result, overloaded.
    """

    def __init__(self, *behaviours: str, seed: int = 7, tool_calls: int = 2) -> None:
        self.behaviours = list(behaviours) or ["ok"]
        self.rng = random.Random(seed)
        self.tool_calls = tool_calls
        self.runs: list[FakeProcess] = []

    version = "2.1.221"

    def __call__(self, proc: FakeProcess) -> Iterator[Step]:
        if proc.argv[1:] == ["--version"]:  # the adapter's preflight: not an agent run
            yield from chunked(f"{self.version} (Claude Code)\n", self.rng)
            yield Exit(0)
            return
        behaviour = self.behaviours[min(len(self.runs), len(self.behaviours) - 1)]
        self.runs.append(proc)
        problem = self._cli_problem(proc)
        if problem is not None:
            yield from chunked(problem + "\n", self.rng, stream=Err)
            yield Exit(1)
            return
        yield from getattr(self, f"_{behaviour}")(proc)

    # -- what the real CLI refuses --------------------------------------------------------
    @staticmethod
    def _cli_problem(proc: FakeProcess) -> str | None:
        argv = proc.argv
        if "-p" not in argv:
            return "error: interactive mode needs a TTY"
        if proc.arg("--output-format") == "stream-json" and "--verbose" not in argv:
            return "Error: When using --print, --output-format=stream-json requires --verbose"
        if "--dangerously-skip-permissions" in argv and proc.user == "root":
            return ("--dangerously-skip-permissions cannot be used with root/sudo privileges "
                    "for security reasons")
        if not (proc.envs.get("ANTHROPIC_API_KEY") or proc.envs.get("CLAUDE_CODE_OAUTH_TOKEN")):
            return "Not logged in · Please run /login"
        config = proc.arg("--mcp-config")
        if config is not None and config not in proc.sandbox.files:
            return f"Error: MCP config file not found: {config}"
        return None

    # -- stream-json ------------------------------------------------------------------------
    def _emit(self, *events: dict[str, Any], noise: str = "") -> list[Step]:
        text = noise + "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
        return chunked(text, self.rng)

    @staticmethod
    def _servers(proc: FakeProcess, force_failed: bool) -> list[dict[str, str]]:
        path = proc.arg("--mcp-config")
        if path is None:
            return []
        configured = json.loads(proc.sandbox.files[path])["mcpServers"]
        envd = proc.sandbox
        servers = []
        for name, server in configured.items():
            reachable = (server.get("url") == envd.gateway_url and envd.gateway_token and
                         server.get("headers", {}).get("Authorization")
                         == f"Bearer {envd.gateway_token}")
            ok = reachable and not force_failed
            servers.append({"name": name, "status": "connected" if ok else "failed"})
        return servers

    def _init(self, proc: FakeProcess, session: str, force_failed: bool = False
              ) -> dict[str, Any]:
        servers = self._servers(proc, force_failed)
        mcp_tools = [f"mcp__{s['name']}__web_search_exa" for s in servers
                     if s["status"] == "connected"]
        return {"type": "system", "subtype": "init", "session_id": session,
                "cwd": proc.cwd, "model": proc.arg("--model") or "claude-sonnet-4-5",
                "tools": BUILTIN_TOOLS + mcp_tools, "mcp_servers": servers,
                "permissionMode": "bypassPermissions", "apiKeySource": "ANTHROPIC_API_KEY"}

    def _work(self, session: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for i in range(self.tool_calls):
            tool_id = f"toolu_{i:02d}"
            events.append({"type": "assistant", "session_id": session, "message": {
                "role": "assistant", "usage": {"input_tokens": 100, "output_tokens": 20},
                "content": [{"type": "tool_use", "id": tool_id,
                             "name": f"mcp__{GATEWAY_NAME}__web_search_exa",
                             "input": {"query": f"step {i}"}}]}})
            events.append({"type": "user", "session_id": session, "message": {
                "role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                             "content": f"result {i}"}]}})
        return events

    @staticmethod
    def _text(session: str, text: str) -> dict[str, Any]:
        return {"type": "assistant", "session_id": session, "message": {
            "role": "assistant", "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": 50, "output_tokens": 30}}}

    def _result(self, session: str, text: str, *, is_error: bool = False,
                cost: float = SUCCESS_COST) -> dict[str, Any]:
        return {"type": "result", "subtype": "success", "is_error": is_error,
                "duration_ms": 2345, "duration_api_ms": 2000, "num_turns": self.tool_calls + 1,
                "result": text, "session_id": session, "total_cost_usd": cost,
                "usage": {"input_tokens": 250, "output_tokens": 70}}

    def _finish(self, proc: FakeProcess, text: str) -> Iterator[Step]:
        session = str(uuid.uuid4())
        yield from self._emit(self._init(proc, session), *self._work(session),
                              self._text(session, text), self._result(session, text),
                              noise=NOISE)
        yield from chunked("(node:12) ExperimentalWarning: fetch\n", self.rng, stream=Err)
        yield Exit(0)

    # -- behaviours ---------------------------------------------------------------------------
    def _ok(self, proc: FakeProcess) -> Iterator[Step]:
        prompt = proc.stdin().decode("utf-8", "surrogatepass")
        yield from self._finish(proc, f"Done. I was asked:\n{prompt}")

    def _leak(self, proc: FakeProcess) -> Iterator[Step]:
        token = proc.sandbox.gateway_config["exa"]["apiKey"]
        model_key = proc.envs["ANTHROPIC_API_KEY"]
        yield from self._finish(proc, f"exa key {token}, model key {model_key}")

    def _hang(self, proc: FakeProcess) -> Iterator[Step]:
        session = str(uuid.uuid4())
        yield from self._emit(self._init(proc, session), noise=NOISE)
        yield HANG

    def _silent(self, proc: FakeProcess) -> Iterator[Step]:
        yield HANG

    def _gateway_failed(self, proc: FakeProcess) -> Iterator[Step]:
        session = str(uuid.uuid4())
        yield from self._emit(self._init(proc, session, force_failed=True), noise=NOISE)
        yield HANG  # it would carry on without its tools; the adapter must stop it

    def _no_result(self, proc: FakeProcess) -> Iterator[Step]:
        session = str(uuid.uuid4())
        yield from self._emit(self._init(proc, session), self._text(session, "partial"))
        yield Exit(0)

    def _overloaded(self, proc: FakeProcess) -> Iterator[Step]:
        session = str(uuid.uuid4())
        text = ('API Error: 529 {"type":"error","error":{"type":"overloaded_error",'
                '"message":"Overloaded"}}')
        yield from self._emit(self._init(proc, session),
                              self._result(session, text, is_error=True, cost=ERROR_COST))
        yield Exit(1)


# -- wiring --------------------------------------------------------------------------------


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "e2b_api_key": E2B_KEY, "anthropic_api_key": ANTHROPIC_KEY, "backoff_scale": 0,
        "default_timeout_s": 60, "max_timeout_s": 120, "sandbox_lifetime_s": 300,
        "visibility_timeout_s": 600, "gateway_ready_timeout_s": 2, "e2b_request_timeout_s": 10,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


class Harness:
    """A pipeline on the E2B provider over `cloud`, and what one run of it reported."""

    def __init__(self, cloud: FakeE2BCloud, claude: FakeClaude, *,
                 settings: Settings | None = None, stall_timeout_s: float = 10.0) -> None:
        self.cloud = cloud
        self.claude = claude
        cloud.programs["claude"] = claude
        settings = settings or make_settings()
        provider = E2BProvider(settings, http=httpx.Client(transport=cloud.gateway_transport),
                               sdk=cloud.Sandbox)
        self.pipeline = Pipeline(settings, provider, ClaudeCodeAgent(),
                                 environ={"EXA_API_KEY": EXA_SECRET, "HOME": "/root"},
                                 runner=AgentRunner(Watchdog(tick_s=0.02),
                                                    stall_timeout_s=stall_timeout_s))
        self.events: list[dict[str, Any]] = []
        self.elapsed = 0.0

    def run(self, task: AgentTask, timeout_s: float = 30.0) -> AgentResult:
        now = time.time()
        ctx = TaskContext(task_id=str(uuid.uuid4()),
                          message=TaskMessage(task=task, submitted_at=now - 0.25),
                          started_at=now, deadline_at=now + timeout_s,
                          on_event=self.events.append)
        t0 = time.monotonic()
        result = self.pipeline.run(ctx)
        self.elapsed = time.monotonic() - t0
        return result

    def assert_all_killed(self) -> None:
        """Sandboxes cost money while alive: every one created must have been killed."""
        assert self.cloud.created, "no sandbox was created"
        assert self.cloud.live == []
        killed = {sid for sid, _ in self.cloud.kill_calls}
        assert {s.sandbox_id for s in self.cloud.created} <= killed


def make_task(prompt: str = "Find the three newest papers on sandboxing.", *,
              max_attempts: int = 3, mcp: dict[str, Any] | None = None) -> AgentTask:
    return AgentTask(prompt=prompt, mcp=MCP if mcp is None else mcp,
                     retry=RetryPolicy(max_attempts=max_attempts, backoff_s=0))


def claude_runs(envd: FakeEnvd) -> list[FakeProcess]:
    """Agent runs (not the `claude --version` preflight)."""
    return [p for p in envd.processes_of("claude") if p.argv[1:] != ["--version"]]


@pytest.fixture
def cloud() -> FakeE2BCloud:
    return FakeE2BCloud(api_key=E2B_KEY)


# -- success ---------------------------------------------------------------------------------


def test_success_fills_the_result(cloud: FakeE2BCloud) -> None:
    """Everything a caller reads off a successful run comes from the agent's stream."""
    h = Harness(cloud, FakeClaude("ok"))
    result = h.run(make_task())

    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.error is None
    assert result.result is not None and result.result.startswith("Done. I was asked:")
    assert result.is_error is False
    assert result.num_turns == 3
    assert result.total_cost_usd == SUCCESS_COST
    assert result.usage == {"input_tokens": 250, "output_tokens": 70}
    assert result.session_id
    assert [(t.name, t.count) for t in result.tool_calls] == [
        (f"mcp__{GATEWAY_NAME}__web_search_exa", 2)]
    assert [(s.name, s.status) for s in result.mcp_servers] == [(GATEWAY_NAME, "connected")]
    assert result.attempts == 1
    assert result.simulated is False
    (envd,) = cloud.created
    assert result.sandbox_id == envd.sandbox_id
    timings = result.timings
    for value in (timings.queued_s, timings.sandbox_create_s, timings.gateway_ready_s,
                  timings.agent_run_s, timings.total_s):
        assert value is not None and value >= 0
    assert timings.queued_s is not None and timings.queued_s >= 0.2
    phases = [e.get("phase") for e in h.events]
    assert phases[:3] == ["sandbox_created", "gateway_ready", "agent_started"]
    assert phases.count("tool_call") == 2
    h.assert_all_killed()


def test_the_prompt_reaches_the_agent_byte_exact_and_never_the_command_line(
        cloud: FakeE2BCloud) -> None:
    """Quotes, $(...), backticks and non-ASCII must neither break nor run in a shell."""
    prompt = ("Say \"hi\" and 'bye' -- $(touch /tmp/pwned) `id` ${HOME} \\n; rm -rf ~ &\n"
              "line two\ttabbed < input > output | cat\n naïve 日本語 🎉 \u2028 end\n")
    h = Harness(cloud, FakeClaude("ok"))
    result = h.run(make_task(prompt))

    assert result.status is TaskStatus.SUCCEEDED, result.error
    (envd,) = cloud.created
    assert envd.files[PROMPT_PATH] == prompt.encode()
    assert envd.file_owners[PROMPT_PATH] == "user"
    (proc,) = claude_runs(envd)
    assert proc.stdin_path == PROMPT_PATH
    assert proc.user == "user"
    for piece in ("$(touch", "`id`", "日本語", "line two", "bye", prompt):
        assert piece not in proc.cmd
    assert result.result == f"Done. I was asked:\n{prompt}"


def test_the_mcp_config_names_the_gateway_url_and_token(cloud: FakeE2BCloud) -> None:
    """Claude Code reaches the gateway only through this file: URL and bearer token."""
    h = Harness(cloud, FakeClaude("ok"))
    assert h.run(make_task()).status is TaskStatus.SUCCEEDED
    (envd,) = cloud.created
    config = json.loads(envd.files[MCP_CONFIG_PATH])
    assert config == {"mcpServers": {GATEWAY_NAME: {
        "type": "http", "url": envd.gateway_url,
        "headers": {"Authorization": f"Bearer {envd.gateway_token}"}}}}
    assert envd.gateway_token and envd.gateway_user == "root"
    assert envd.gateway_config == {"exa": {"apiKey": EXA_SECRET}}
    (proc,) = claude_runs(envd)
    assert proc.arg("--mcp-config") == MCP_CONFIG_PATH
    assert "--strict-mcp-config" in proc.argv


def test_a_task_without_mcp_servers_runs_without_gateway(cloud: FakeE2BCloud) -> None:
    """No gateway to start or wait for, and no --mcp-config for a file never written."""
    h = Harness(cloud, FakeClaude("ok", tool_calls=0))
    result = h.run(make_task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    (envd,) = cloud.created
    assert envd.processes_of("mcp-gateway") == []
    assert MCP_CONFIG_PATH not in envd.files
    (proc,) = claude_runs(envd)
    assert "--mcp-config" not in proc.argv
    assert result.mcp_servers == []
    assert result.timings.gateway_ready_s is None
    h.assert_all_killed()


def test_secrets_are_redacted_from_the_result(cloud: FakeE2BCloud) -> None:
    """An agent echoing a resolved ${ENV} token or the model key must not leak it."""
    h = Harness(cloud, FakeClaude("leak"))
    result = h.run(make_task())
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert cloud.created[0].gateway_config == {"exa": {"apiKey": EXA_SECRET}}
    dumped = result.model_dump_json()
    assert EXA_SECRET not in dumped
    assert ANTHROPIC_KEY not in dumped
    assert result.result == "exa key [REDACTED], model key [REDACTED]"
    assert EXA_SECRET not in json.dumps(h.events)


# -- retries ----------------------------------------------------------------------------------


def test_rate_limit_in_a_sandbox_is_retried_in_a_fresh_one(cloud: FakeE2BCloud) -> None:
    """envd's 429 on the prompt upload: a new attempt, a new sandbox, both killed."""
    def limit_first(envd: FakeEnvd) -> None:
        if len(cloud.created) == 1:
            envd.write_failures.append(httpx.Response(429, json={"message": "slow down"}))

    cloud.on_create.append(limit_first)
    h = Harness(cloud, FakeClaude("ok"))
    result = h.run(make_task())
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 2
    assert len(cloud.created) == 2
    assert result.sandbox_id == cloud.created[1].sandbox_id
    assert claude_runs(cloud.created[0]) == []
    assert any(e.get("phase") == "retrying" for e in h.events)
    keys = [c["idempotency_key"] for c in cloud.create_calls]
    assert len(set(keys)) == 2
    h.assert_all_killed()


def test_rate_limit_at_create_is_retried(cloud: FakeE2BCloud) -> None:
    cloud.create_failures.append(api_exception_from_code(429, "too many sandboxes"))
    h = Harness(cloud, FakeClaude("ok"))
    result = h.run(make_task())
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 2
    assert len(cloud.create_calls) == 2 and len(cloud.created) == 1
    h.assert_all_killed()


def test_an_overloaded_model_is_retried(cloud: FakeE2BCloud) -> None:
    """`API Error: 529 overloaded` is transient; the cost of both attempts is reported."""
    h = Harness(cloud, FakeClaude("overloaded", "ok"))
    result = h.run(make_task())
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 2
    assert len(h.claude.runs) == 2
    assert result.total_cost_usd == pytest.approx(SUCCESS_COST + ERROR_COST)
    h.assert_all_killed()


def test_overloaded_on_every_attempt_fails_as_model_unavailable(cloud: FakeE2BCloud) -> None:
    h = Harness(cloud, FakeClaude("overloaded"))
    result = h.run(make_task(max_attempts=2))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "model_unavailable"
    assert result.attempts == 2
    h.assert_all_killed()


def test_a_refused_e2b_key_fails_at_once_without_retry(cloud: FakeE2BCloud) -> None:
    """Retrying a wrong key only burns the task's time; the message says what to fix."""
    h = Harness(cloud, FakeClaude("ok"), settings=make_settings(e2b_api_key="e2b_wrong"))
    result = h.run(make_task())
    assert result.status is TaskStatus.FAILED
    assert result.error is not None
    assert result.error.category.value == "auth"
    assert result.error.retryable is False
    assert "E2B_API_KEY" in result.error.message
    assert result.attempts == 1
    assert len(cloud.create_calls) == 1
    assert cloud.created == []


# -- failures that must stop the run --------------------------------------------------------


def sigkilled(envd: FakeEnvd) -> bool:
    pids = {p.pid for p in claude_runs(envd)}
    return any(pid in pids and sig == process_pb.Signal.SIGKILL for pid, sig in envd.signals)


def test_a_hung_agent_is_stopped_at_the_deadline(cloud: FakeE2BCloud) -> None:
    """The deadline kills the command and the sandbox; the task is timed_out, not failed."""
    h = Harness(cloud, FakeClaude("hang"))
    result = h.run(make_task(), timeout_s=0.6)
    assert result.status is TaskStatus.TIMED_OUT, result.error
    assert result.error is not None and result.error.category.value == "timeout"
    assert h.elapsed < 3
    (envd,) = cloud.created
    assert sigkilled(envd)
    assert result.attempts == 1
    h.assert_all_killed()


def test_a_silent_agent_is_stopped_as_stalled(cloud: FakeE2BCloud) -> None:
    h = Harness(cloud, FakeClaude("silent"), stall_timeout_s=0.3)
    result = h.run(make_task(max_attempts=1))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "agent_stalled"
    assert result.error.retryable is True
    assert h.elapsed < 3
    assert sigkilled(cloud.created[0])
    h.assert_all_killed()


def test_a_failed_gateway_in_claude_code_stops_the_run(cloud: FakeE2BCloud) -> None:
    """Without its tools the agent would answer from memory: stop it and say why."""
    h = Harness(cloud, FakeClaude("gateway_failed"))
    result = h.run(make_task(max_attempts=1))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "mcp_unavailable"
    assert h.elapsed < 3
    assert sigkilled(cloud.created[0])
    assert [(s.name, s.status) for s in result.mcp_servers] == [(GATEWAY_NAME, "failed")]
    h.assert_all_killed()


def test_exit_zero_without_a_result_event_is_no_result(cloud: FakeE2BCloud) -> None:
    """A clean exit code is not success: the result event is."""
    h = Harness(cloud, FakeClaude("no_result"))
    result = h.run(make_task(max_attempts=1))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "agent_no_result"
    assert result.result == "partial"
    h.assert_all_killed()


def test_a_sandbox_dying_under_the_agent_is_retried(cloud: FakeE2BCloud) -> None:
    """E2B reaping the first sandbox mid-run: a fresh attempt, no sandbox left behind."""
    def reap_first(proc: FakeProcess) -> Iterator[Step]:
        if len(cloud.created) == 1:
            proc.sandbox.shutdown()
            yield HANG
        else:
            yield from claude(proc)

    claude = FakeClaude("ok")
    h = Harness(cloud, claude)
    cloud.programs["claude"] = reap_first
    result = h.run(make_task())
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.attempts == 2
    h.assert_all_killed()



def test_a_gateway_that_never_answers_is_a_gateway_timeout(cloud: FakeE2BCloud) -> None:
    """The agent is not started against a gateway that is not there; the sandbox goes."""
    cloud.gateway_502s = float("inf")
    h = Harness(cloud, FakeClaude("ok"), settings=make_settings(gateway_ready_timeout_s=0.3))
    result = h.run(make_task(max_attempts=1), timeout_s=2.0)
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "gateway_timeout"
    assert result.error.retryable is True
    assert h.claude.runs == []
    # no side effects yet: retried in fresh sandboxes until the deadline, all of them killed
    assert result.infra_retries >= 1 and len(cloud.created) == result.attempts
    assert h.elapsed < 6
    h.assert_all_killed()


def test_a_gateway_that_fails_to_start_is_a_config_error_without_retry(
        cloud: FakeE2BCloud) -> None:
    """The SDK's "Failed to start MCP gateway" means a bad server config: permanent."""
    cloud.gateway_failure = (1, "exa: invalid apiKey\n")
    h = Harness(cloud, FakeClaude("ok"))
    result = h.run(make_task())
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "mcp_config"
    assert "invalid apiKey" in result.error.message
    assert result.attempts == 1
    assert h.claude.runs == []
    h.assert_all_killed()


def test_a_gateway_refusing_its_token_is_a_permanent_auth_error(cloud: FakeE2BCloud) -> None:
    """Given a gateway that answers 401 to the token the SDK gave it, the task fails at
    once as `auth`: no second sandbox, no agent run (a retry gets the same refusal)."""
    def stale_token(request: httpx.Request) -> httpx.Response:
        request.headers["Authorization"] = "Bearer not-the-gateway-token"
        return cloud.handle_gateway(request)

    h = Harness(cloud, FakeClaude("ok"))
    h.pipeline.provider._http = httpx.Client(  # type: ignore[attr-defined]
        transport=httpx.MockTransport(stale_token))
    result = h.run(make_task(max_attempts=3))
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category.value == "auth"
    assert result.error.retryable is False
    assert "401" in result.error.message
    assert result.attempts == 1
    assert len(cloud.create_calls) == 1
    assert h.claude.runs == []
    h.assert_all_killed()


def test_a_command_line_over_the_exec_limit_is_refused_clearly(cloud: FakeE2BCloud) -> None:
    """The agent's flags (append_system_prompt, the output schema) travel in the one `bash -c`
    argument, which Linux caps at 128 KiB (MAX_ARG_STRLEN); envd answers E2BIG with an
    INVALID_ARGUMENT quoting the whole command. A task within each field's own limit can
    still cross it (quoting a `'` takes 5 bytes): it must fail permanently, say which fields
    to shorten, and not carry the 128 KiB command in its error."""
    h = Harness(cloud, FakeClaude("ok"))
    task = make_task().model_copy(update={"append_system_prompt": "'x" * 25000})
    result = h.run(task)
    assert result.error is not None and result.error.category.value == "invalid_task"
    assert "append_system_prompt" in result.error.message
    assert len(result.error.message) < 1000
    assert claude_runs(cloud.created[0]) == []
    h.assert_all_killed()
