"""The pipeline end to end in-process with the simulated provider: every failure path by name.

The scripted agent's behaviour is set per task through SIM_* variables in `envs` (see
worker/sandbox/sim.py). After every run the provider must hold no live sandbox.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from sandqueue.contract import AgentResult, AgentTask, ErrorCategory, TaskMessage, TaskStatus
from sandqueue.sealing import Sealer, generate_key
from sandqueue.settings import Settings
from worker.agent.claude_code import GATEWAY_NAME, ClaudeCodeAgent
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.pipeline import Pipeline, TaskContext
from worker.redact import MASK
from worker.sandbox.sim import SimProvider

WATCHDOG = Watchdog(tick_s=0.02)
"""One watchdog thread for the whole module, as a worker process has."""

MODEL_KEY = "sk-ant-api03-unit-test-secret-key"
NOTION_TOKEN = "ntn_unit_test_token_0042"
INLINE_TOKEN = "inline-token-abcdef-987"
SEALED_TOKEN = "ntn_sealed_per_task_token_77"
ENVIRON = {"NOTION_TOKEN": NOTION_TOKEN}
NOTION = {"notion": {"internalIntegrationToken": "${NOTION_TOKEN}"}}
MCP_TOOL = f"mcp__{GATEWAY_NAME}__notion_search"
FAST = {"SIM_LATENCY_S": "0.05"}
ECHO_MARK = "\n--- prompt ---\n"


def assert_no_live_sandboxes(provider: SimProvider) -> None:
    """Sandboxes cost money while alive: every one created must have been killed."""
    assert provider.list_live() == []
    assert provider.registry.created == provider.registry.killed
    assert provider._live == {}


@dataclass
class Harness:
    settings: Settings
    provider: SimProvider
    pipeline: Pipeline
    events: list[dict[str, Any]] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[str] = field(default_factory=list)

    def run(self, prompt: str = "Say hello", *, cancel: bool = False,
            **fields: Any) -> AgentResult:
        task = AgentTask(prompt=prompt, **fields)
        now = time.time()
        ctx = TaskContext(
            task_id=f"task-{len(self.states)}", message=TaskMessage(task=task, submitted_at=now),
            started_at=now, deadline_at=now + self.settings.deadline_for(task.timeout_s),
            on_state=lambda **kw: self.states.append(kw), on_event=self.events.append,
            on_tool_call=self.tool_calls.append,
        )
        if cancel:
            ctx.cancel.set()
        result = self.pipeline.run(ctx)
        assert_no_live_sandboxes(self.provider)
        return result

    @property
    def created(self) -> int:
        return self.provider.registry.created


def make_harness(environ: dict[str, str] | None = None, **overrides: Any) -> Harness:
    fields: dict[str, Any] = {"backoff_scale": 0, "sim_create_latency_s": 0,
                              "sim_latency_s": 0.05, **overrides}
    settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
    provider = SimProvider(settings)
    pipeline = Pipeline(settings, provider, ClaudeCodeAgent(),
                        environ=dict(ENVIRON if environ is None else environ),
                        runner=AgentRunner(WATCHDOG, stall_timeout_s=0.5))
    return Harness(settings, provider, pipeline)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = make_harness(anthropic_api_key=MODEL_KEY)
    yield h
    assert_no_live_sandboxes(h.provider)


def _echoed_prompt(result: AgentResult) -> str:
    assert result.result is not None and ECHO_MARK in result.result
    return result.result.split(ECHO_MARK, 1)[1]


def _failed(result: AgentResult, category: ErrorCategory, *, attempts: int,
            retryable: bool) -> None:
    assert result.status is TaskStatus.FAILED, result.error
    assert result.error is not None
    assert result.error.category is category, result.error.message
    assert result.error.retryable is retryable
    assert result.attempts == attempts


# -- success ----------------------------------------------------------------------------------

TRICKY = ("Quote ' and \" and `ls` and $(whoami) and ${HOME} and \\ and ; rm -rf / #\n"
          "Ünïcödé ✓ 日本語 🎉\r\nlast line without newline  ")


def test_success_fills_the_result(harness: Harness) -> None:
    result = harness.run(TRICKY, envs={**FAST, "SIM_TOOL_CALLS": "3", "SIM_COST_USD": "0.25"},
                         labels={"team": "unit"})
    assert result.status is TaskStatus.SUCCEEDED and result.ok
    assert result.error is None
    assert result.simulated is True
    assert result.attempts == 1
    assert _echoed_prompt(result) == TRICKY
    assert [(t.name, t.count) for t in result.tool_calls] == [("Bash", 3)]
    assert result.tool_call_total == 3
    assert result.num_turns == 4
    assert result.total_cost_usd == 0.25
    assert result.is_error is False and result.subtype == "success"
    assert result.usage["input_tokens"] > 0
    assert result.session_id
    assert result.sandbox_id is not None and result.sandbox_id.startswith("sim-")
    assert result.labels == {"team": "unit"}
    assert result.timings.total_s is not None and result.timings.agent_run_s is not None
    assert harness.created == 1
    assert harness.states[0] == {"status": TaskStatus.RUNNING, "attempt": 1}
    assert {"sandbox_id": result.sandbox_id} in harness.states
    assert harness.tool_calls == ["Bash", "Bash", "Bash"]


def test_success_with_mcp_reports_the_gateway_and_its_tools(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_TOOL_CALLS": "2"}, mcp=NOTION)
    assert result.ok
    assert [(s.name, s.status) for s in result.mcp_servers] == [(GATEWAY_NAME, "connected")]
    assert [(t.name, t.count) for t in result.tool_calls] == [(MCP_TOOL, 2)]
    assert result.timings.gateway_ready_s is not None
    phases = [e.get("phase") for e in harness.events]
    assert phases[:3] == ["sandbox_created", "gateway_ready", "agent_started"]
    assert phases.count("tool_call") == 2


@hyp_settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=400).filter(lambda s: bool(s.strip())))
def test_any_prompt_reaches_the_agent_byte_exact(prompt: str) -> None:
    h = make_harness(sim_latency_s=0)
    result = h.run(prompt)
    assert result.ok, result.error
    assert _echoed_prompt(result) == prompt


# -- transient failures -----------------------------------------------------------------------


@pytest.mark.parametrize(("fail", "attempts", "created"),
                         [("create:rate_limit:2", 3, 1), ("create:unavailable:1", 2, 1),
                          ("agent:overloaded:1", 2, 2), ("agent:rate_limit:1", 2, 2),
                          ("agent:silent_exit:1", 2, 2), ("agent:crash:2", 3, 3)])
def test_transient_failures_are_retried_then_succeed(harness: Harness, fail: str, attempts: int,
                                                     created: int) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": fail})
    assert result.ok, result.error
    assert result.attempts == attempts
    assert harness.created == created  # each attempt that got a sandbox got a fresh one
    retrying = [e for e in harness.events if e.get("phase") == "retrying"]
    assert len(retrying) == attempts - 1


@pytest.mark.parametrize(
    ("fail", "category", "mcp"),
    [("agent:mcp_failed", ErrorCategory.MCP_UNAVAILABLE, NOTION),
     ("agent:silent_exit", ErrorCategory.AGENT_NO_RESULT, {}),
     ("agent:overloaded", ErrorCategory.MODEL_UNAVAILABLE, {})],
)
def test_exhausted_retries_fail_with_the_category(harness: Harness, fail: str,
                                                  category: ErrorCategory,
                                                  mcp: dict[str, Any]) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": fail}, mcp=mcp)
    _failed(result, category, attempts=3, retryable=True)
    assert result.agent_runs == 3 and result.infra_retries == 0


@pytest.mark.parametrize(
    ("fail", "category", "mcp"),
    [("create:rate_limit", ErrorCategory.RATE_LIMITED, {}),
     ("create:unavailable", ErrorCategory.SANDBOX_UNAVAILABLE, {}),
     ("gateway:timeout", ErrorCategory.GATEWAY_TIMEOUT, NOTION),
     ("gateway:no_tools", ErrorCategory.GATEWAY_TIMEOUT, NOTION)],
)
def test_infrastructure_failures_are_retried_until_the_deadline(
        harness: Harness, fail: str, category: ErrorCategory, mcp: dict[str, Any]) -> None:
    # Before the agent runs nothing has side effects: retried past max_attempts (3), with
    # backoff, for as long as the deadline allows
    result = harness.run(envs={**FAST, "SIM_FAIL": fail}, mcp=mcp, timeout_s=3.0)
    assert result.error is not None and result.agent_runs == 0
    assert result.infra_retries > 3 and result.attempts == result.infra_retries + 1
    if result.status is TaskStatus.FAILED:  # the backoff saw the deadline coming
        assert result.error.category is category
        assert "no time left before the task's deadline" in result.error.message
    else:  # on a loaded machine the last attempt may still be running when the clock strikes
        assert result.status is TaskStatus.TIMED_OUT
        assert f"retrying after {category.value}" in result.error.message


def test_a_deadline_that_strikes_mid_retry_names_the_failure_being_retried(
        harness: Harness) -> None:
    # Sandbox creation slower than the time left: the deadline ends an attempt, and the
    # result says what the task was retrying, not only that the clock ran out
    result = harness.run(envs={**FAST, "SIM_CREATE_LATENCY_S": "2", "SIM_FAIL": "gateway:timeout"},
                         mcp=NOTION, timeout_s=3.0)
    assert result.status is TaskStatus.TIMED_OUT, result.error
    assert result.error is not None and result.error.category is ErrorCategory.TIMEOUT
    assert "retrying after gateway_timeout" in result.error.message
    assert result.agent_runs == 0 and result.infra_retries >= 1


def test_six_creation_failures_in_a_row_are_ridden_out(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "create:unavailable:6"})
    assert result.ok, result.error
    assert (result.infra_retries, result.agent_runs, result.attempts) == (6, 1, 7)
    assert [e.outcome for e in result.attempt_log] == ["sandbox_unavailable"] * 6 + [
        "succeeded"]
    assert [e.agent_ran for e in result.attempt_log] == [False] * 6 + [True]


def test_max_attempts_of_the_task_is_honoured(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:overloaded"},
                         retry={"max_attempts": 5})
    _failed(result, ErrorCategory.MODEL_UNAVAILABLE, attempts=5, retryable=True)
    assert result.agent_runs == 5 and harness.created == 5


def test_mcp_failure_is_reported_with_the_gateway_status(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:mcp_failed"}, mcp=NOTION,
                         retry={"max_attempts": 1})
    _failed(result, ErrorCategory.MCP_UNAVAILABLE, attempts=1, retryable=True)
    assert [(s.name, s.status) for s in result.mcp_servers] == [(GATEWAY_NAME, "failed")]


# -- permanent failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "category"),
    [("create:auth", ErrorCategory.AUTH), ("create:gateway_config", ErrorCategory.MCP_CONFIG),
     ("gateway:unauthorized", ErrorCategory.AUTH),
     ("create:template", ErrorCategory.INVALID_TASK), ("agent:auth", ErrorCategory.AUTH),
     ("gateway:unauthorized", ErrorCategory.AUTH),
     ("agent:is_error", ErrorCategory.AGENT_ERROR)],
)
def test_permanent_failures_end_after_one_attempt(harness: Harness, fail: str,
                                                  category: ErrorCategory) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": fail}, mcp=NOTION)
    _failed(result, category, attempts=1, retryable=False)


@pytest.mark.parametrize(
    ("fail", "says"),
    [("agent:hnag", "not a simulated failure"), ("sandbox:rate_limit", "not a simulated failure"),
     ("create:rate_limit:two", "attempt count 'two'"), ("create:rate_limit:0", "at least 1"),
     ("agent", "where:what[:attempts]"), ("agent:hang:1:2", "where:what[:attempts]"),
     ("create::2", "where:what[:attempts]")],
)
def test_bad_sim_fail_directives_are_the_tasks_fault(harness: Harness, fail: str,
                                                     says: str) -> None:
    """A typo in SIM_FAIL must not pass as a success, nor crash as `internal` with a
    Python ValueError: it is an invalid task, permanent, saying what is wrong."""
    result = harness.run(envs={**FAST, "SIM_FAIL": fail}, mcp=NOTION)
    _failed(result, ErrorCategory.INVALID_TASK, attempts=1, retryable=False)
    assert result.error is not None
    assert says in result.error.message
    assert "ValueError" not in result.error.message
    assert harness.created == 0


def test_unknown_sim_fail_directive_lists_the_known_ones(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "create:rate_limit:1,gateway:401"})
    assert result.error is not None
    assert "'gateway:401'" in result.error.message
    assert "gateway:timeout|unauthorized" in result.error.message


def test_agent_error_result_is_kept(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:is_error", "SIM_TOOL_CALLS": "1"})
    _failed(result, ErrorCategory.AGENT_ERROR, attempts=1, retryable=False)
    assert result.is_error is True
    assert result.subtype == "error_during_execution"
    # The error arm of a result has `errors` and no `result` text: the last text is kept
    assert "The agent could not complete the task" in result.error.message  # type: ignore[union-attr]
    assert result.result is not None and result.result.startswith("Step")


def test_unresolvable_env_reference_fails_before_any_sandbox() -> None:
    h = make_harness(environ={}, anthropic_api_key=MODEL_KEY)
    result = h.run(envs=FAST, mcp=NOTION)
    assert result.status is TaskStatus.FAILED
    assert result.error is not None
    assert result.error.category is ErrorCategory.MCP_CONFIG
    assert result.error.retryable is False
    assert "NOTION_TOKEN" in result.error.message
    assert result.attempts <= 1
    assert h.created == 0
    assert result.sandbox_id is None


def test_invalid_sim_directive_is_an_invalid_task(harness: Harness) -> None:
    result = harness.run(envs={"SIM_FAIL": "agent"})
    _failed(result, ErrorCategory.INVALID_TASK, attempts=1, retryable=False)


def test_max_turns_below_the_tool_calls_fails_as_max_turns_unretried(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_TOOL_CALLS": "3"}, max_turns=2)
    _failed(result, ErrorCategory.MAX_TURNS, attempts=1, retryable=False)
    assert result.subtype == "error_max_turns"
    assert "error_max_turns" in result.error.message  # type: ignore[union-attr]


# -- stalls, deadlines, cancellation ----------------------------------------------------------


def test_a_hanging_agent_is_stopped_as_stalled(harness: Harness) -> None:
    started = time.monotonic()
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:hang"}, retry={"max_attempts": 1})
    _failed(result, ErrorCategory.AGENT_STALLED, attempts=1, retryable=True)
    assert time.monotonic() - started < 10  # generous; a hang not noticed never ends


def test_a_stall_is_retried_in_a_fresh_sandbox(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:hang:1"})
    assert result.ok and result.attempts == 2
    assert harness.created == 2


def test_a_task_past_its_deadline_times_out(harness: Harness) -> None:
    started = time.monotonic()
    result = harness.run(envs={"SIM_LATENCY_S": "30"}, timeout_s=0.3)
    assert result.status is TaskStatus.TIMED_OUT
    assert result.error is not None and result.error.category is ErrorCategory.TIMEOUT
    assert result.error.retryable is False
    assert time.monotonic() - started < 10  # generous, and far below the agent's 30 s


def test_a_cancelled_task_ends_cancelled(harness: Harness) -> None:
    result = harness.run(envs=FAST, cancel=True)
    assert result.status is TaskStatus.CANCELLED
    assert result.error is not None and result.error.category is ErrorCategory.CANCELLED


# -- side effects -----------------------------------------------------------------------------


def test_no_retry_after_the_agent_made_a_tool_call(harness: Harness) -> None:
    # Given an agent that makes one tool call, then hangs on its first attempt
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:hang:1", "SIM_TOOL_CALLS": "1"},
                         mcp=NOTION)
    # Then the stall is not retried: the tool call's effects could repeat
    _failed(result, ErrorCategory.AGENT_STALLED, attempts=1, retryable=True)
    assert [(t.name, t.count) for t in result.tool_calls] == [(MCP_TOOL, 1)]
    assert "retry_after_side_effects" in result.error.message  # type: ignore[union-attr]
    assert harness.created == 1


def test_retry_after_side_effects_when_the_task_allows_it(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:hang:1", "SIM_TOOL_CALLS": "1"},
                         mcp=NOTION, retry={"retry_after_side_effects": True})
    assert result.ok, result.error
    assert result.attempts == 2
    assert [(t.name, t.count) for t in result.tool_calls] == [(MCP_TOOL, 1)]


# -- secrets ----------------------------------------------------------------------------------

SECRETS = (MODEL_KEY, NOTION_TOKEN, INLINE_TOKEN)


def _assert_no_secrets(harness: Harness, result: AgentResult) -> None:
    dumped = result.model_dump_json()
    events = json.dumps(harness.events)
    for secret in SECRETS:
        assert secret not in dumped
        assert secret not in events


def test_secrets_never_appear_in_the_result_even_when_echoed(harness: Harness) -> None:
    prompt = f"repeat after me: {MODEL_KEY} / {NOTION_TOKEN} / {INLINE_TOKEN}"
    result = harness.run(prompt, envs={**FAST, "SIM_TOOL_CALLS": "1"},
                         mcp={**NOTION, "github/acme/tools": {
                             "run_cmd": "npx .", "envs": {"TOKEN": INLINE_TOKEN}}},
                         labels={"note": NOTION_TOKEN})
    assert result.ok, result.error
    assert _echoed_prompt(result) == f"repeat after me: {MASK} / {MASK} / {MASK}"
    _assert_no_secrets(harness, result)


def test_secrets_never_appear_in_a_failed_result(harness: Harness) -> None:
    prompt = f"use {NOTION_TOKEN} and {MODEL_KEY}"
    result = harness.run(prompt, envs={**FAST, "SIM_FAIL": "agent:overloaded"}, mcp=NOTION,
                         retry={"max_attempts": 2})
    assert result.status is TaskStatus.FAILED
    _assert_no_secrets(harness, result)


def test_sealed_inline_secrets_are_opened_on_the_worker_and_never_shown() -> None:
    key = generate_key()
    h = make_harness(anthropic_api_key=MODEL_KEY, secret_keys=key)
    sealed = Sealer(key).seal(SEALED_TOKEN)
    assert SEALED_TOKEN not in sealed
    result = h.run(f"the token is {SEALED_TOKEN}", envs=FAST,
                   mcp={"notion": {"internalIntegrationToken": sealed}})
    assert result.ok, result.error
    assert _echoed_prompt(result) == f"the token is {MASK}"
    assert SEALED_TOKEN not in result.model_dump_json()


@pytest.mark.parametrize("worker_keys", [None, "other"], ids=["no-keys", "wrong-key"])
def test_a_sealed_secret_the_worker_cannot_open_fails_before_any_sandbox(
    worker_keys: str | None,
) -> None:
    keys = generate_key() if worker_keys else None
    h = make_harness(secret_keys=keys)
    sealed = Sealer(generate_key()).seal(SEALED_TOKEN)
    result = h.run(envs=FAST, mcp={"notion": {"internalIntegrationToken": sealed}})
    assert result.error is not None
    assert result.error.category is ErrorCategory.MCP_CONFIG
    assert "SANDQUEUE_SECRET_KEYS" in result.error.message
    assert h.created == 0


def test_no_retry_when_the_backoff_would_pass_the_deadline() -> None:
    h = make_harness(backoff_scale=1)
    started = time.monotonic()
    result = h.run(envs={**FAST, "SIM_FAIL": "agent:overloaded"}, timeout_s=2,
                   retry={"backoff_s": 5})
    _failed(result, ErrorCategory.MODEL_UNAVAILABLE, attempts=1, retryable=True)
    assert "no time left" in result.error.message  # type: ignore[union-attr]
    assert time.monotonic() - started < 4  # generous, and below the 5 s backoff it skipped


def test_without_a_model_key_the_sim_agent_still_runs() -> None:
    h = make_harness()
    result = h.run(envs=FAST)
    assert result.ok, result.error


def test_secrets_an_agent_echoes_are_masked_in_the_result_and_events() -> None:
    # Given a sealed credential env, a ${ENV} env and a ${ENV} MCP token that the agent
    # repeats (SIM_ECHO), when the task runs, the agent had the opened values (it says
    # something that is masked, not the sealed form) and nothing shows them.
    key = generate_key()
    h = make_harness(anthropic_api_key=MODEL_KEY, secret_keys=key)
    gh_token = "ghp_" + "Q7" * 20
    envs = {**FAST, "GH": Sealer(key).seal(gh_token), "FROM_WORKER": "${NOTION_TOKEN}",
            "SIM_ECHO": "GH,FROM_WORKER,mcp:notion.internalIntegrationToken"}
    result = h.run(envs=envs, mcp=NOTION)
    assert result.ok, result.error
    assert result.result is not None
    for said in ("GH", "FROM_WORKER", "mcp:notion.internalIntegrationToken"):
        assert f"\n{said} is {MASK}" in result.result
    shown = result.model_dump_json() + json.dumps(h.events) + json.dumps(h.states, default=str)
    assert gh_token not in shown and NOTION_TOKEN not in shown
    assert any(MASK in e.get("text", "") for e in h.events if e["phase"] == "agent_text")
