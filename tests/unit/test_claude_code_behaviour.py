"""Claude Code as it really behaves on healthy and failing runs, through the sim CLI (which
reproduces each behaviour, cited in worker/sandbox/sim_agent.py) and the adapter.

Each test would fail against an adapter that believed the idealised version: `pending` MCP
servers taken for a failure, usage summed per event, allow-lists trusted under bypass mode,
API errors read from the subtype alone."""

from __future__ import annotations

from typing import Any

import pytest

from sandqueue import errors
from sandqueue.contract import AgentResult, AgentTask, ErrorCategory, TaskStatus
from tests.unit.test_pipeline_sim import FAST, MODEL_KEY, NOTION, Harness, make_harness
from worker.agent.claude_code import (
    GATEWAY_NAME,
    build_command,
    classify_result,
    permission_args,
)
from worker.agent.pricing import estimate_usd
from worker.sandbox.sim import SimSandbox
from worker.sandbox.sim_agent import BAD_KEY, SIM_CLAUDE_VERSION

MCP_TOOL = f"mcp__{GATEWAY_NAME}__notion_search"


class Recording:
    """A harness whose sandboxes are kept after the run, to see what ran inside them."""

    def __init__(self, **settings: Any) -> None:
        self.harness: Harness = make_harness(anthropic_api_key=MODEL_KEY, **settings)
        self.sandboxes: list[SimSandbox] = []
        create = self.harness.provider.create

        def keep(spec: Any) -> Any:
            sandbox = create(spec)
            self.sandboxes.append(sandbox)  # type: ignore[arg-type]
            return sandbox

        self.harness.provider.create = keep  # type: ignore[method-assign]

    def run(self, **fields: Any) -> AgentResult:
        return self.harness.run(**fields)

    @property
    def executed(self) -> list[str]:
        return [tool for s in self.sandboxes for tool in s.executed_tools]


# -- MCP status at init -----------------------------------------------------------------------

def test_a_healthy_run_whose_init_says_pending_succeeds() -> None:
    # anthropics/claude-code#74926: servers still connecting are `pending` at init and none
    # of their tools are listed yet; the docs say not to treat that as a failure
    rec = Recording()
    result = rec.run(envs={**FAST, "SIM_MCP_STATUS": "pending", "SIM_TOOL_CALLS": "2"},
                     mcp=NOTION)
    assert result.ok, result.error
    assert [(s.name, s.status) for s in result.mcp_servers] == [(GATEWAY_NAME, "pending")]
    assert rec.executed == [MCP_TOOL, MCP_TOOL]  # its tools worked once connected


@pytest.mark.parametrize(("status", "category"), [("failed", ErrorCategory.MCP_UNAVAILABLE),
                                                  ("needs-auth", ErrorCategory.AUTH)])
def test_a_gateway_failed_or_needing_auth_at_init_fails_fast(status: str,
                                                             category: ErrorCategory) -> None:
    rec = Recording()
    result = rec.run(envs={**FAST, "SIM_MCP_STATUS": status, "SIM_TOOL_CALLS": "2"},
                     mcp=NOTION, retry={"max_attempts": 1})
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category is category
    assert rec.executed == []  # stopped before any tool ran


def test_a_gateway_whose_tools_list_stays_empty_ends_gateway_timeout() -> None:
    h = make_harness(anthropic_api_key=MODEL_KEY)
    result = h.run(envs={**FAST, "SIM_FAIL": "gateway:no_tools"}, mcp=NOTION, timeout_s=3)
    assert result.error is not None
    assert result.error.category is ErrorCategory.GATEWAY_TIMEOUT
    assert "notion" in result.error.message


# -- usage counted once per model message -----------------------------------------------------

def test_usage_repeated_per_message_id_is_counted_once() -> None:
    # The sim streams each response as one event per content block with the same id and
    # usage (anthropics/claude-code#87303). Two tool turns (100 in, 1000 cache read, 20 out)
    # and the answer (50 in, 1000 cache read, 30 out), Sonnet list prices:
    expected = (250 * 3.0 + 3000 * 0.3 + 70 * 15.0) / 1e6
    assert expected == pytest.approx(estimate_usd("claude-sonnet-4-5", {
        "input_tokens": 250, "cache_read_input_tokens": 3000, "output_tokens": 70}))
    h = make_harness(anthropic_api_key=MODEL_KEY)
    # A cap 10% above the true estimate: summing per event (~0.0039) would stop the agent.
    result = h.run(envs={**FAST, "SIM_TOOL_CALLS": "2"}, max_cost_usd=expected * 1.1)
    assert result.ok, result.error
    running = [s["cost_usd"] for s in h.states if "cost_usd" in s]
    assert running[-1] == pytest.approx(expected)
    assert result.usage == {"input_tokens": 250, "cache_read_input_tokens": 3000,
                            "output_tokens": 70}


# -- tool restrictions that restrict ----------------------------------------------------------

def test_a_disallowed_tool_cannot_run() -> None:
    rec = Recording()
    result = rec.run(envs={**FAST, "SIM_TOOLS": "Bash,Read", "SIM_TOOL_CALLS": "4"},
                     disallowed_tools=["Bash"])
    assert result.ok, result.error
    assert rec.executed == ["Read", "Read"]


def test_an_allow_list_binds_although_bypass_mode_would_ignore_it() -> None:
    # Under --dangerously-skip-permissions allow rules have no effect (docs: permission-modes;
    # anthropics/claude-code#12232): the adapter must not rely on them there.
    rec = Recording()
    result = rec.run(envs={**FAST, "SIM_TOOLS": f"Bash,Read,{MCP_TOOL},Write",
                           "SIM_TOOL_CALLS": "4"},
                     mcp=NOTION, allowed_tools=["Read", "mcp:*"])
    assert result.ok, result.error
    assert rec.executed == ["Read", MCP_TOOL]


def test_the_sim_lets_bypass_mode_ignore_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the first adapter did: bypass mode plus --allowedTools. The sim, like the real
    # CLI, ignores the allow-list then, so a test of that adapter fails as production would.
    def naive(task: AgentTask) -> list[str]:
        return ["--dangerously-skip-permissions", "--allowedTools", ",".join(task.allowed_tools)]

    monkeypatch.setattr("worker.agent.claude_code.permission_args", naive)
    rec = Recording()
    result = rec.run(envs={**FAST, "SIM_TOOLS": "Bash,Read", "SIM_TOOL_CALLS": "2"},
                     allowed_tools=["Read"])
    assert result.ok, result.error
    assert rec.executed == ["Bash", "Read"]


def test_neutral_mcp_tool_names_become_gateway_rules() -> None:
    task = AgentTask(prompt="x", allowed_tools=["mcp:search"], disallowed_tools=["mcp:delete*"])
    args = permission_args(task)
    assert args[args.index("--allowedTools") + 1] == f"mcp__{GATEWAY_NAME}__search"
    assert args[args.index("--tools") + 1] == ""  # no built-in allowed: none given
    assert args[args.index("--disallowedTools") + 1] == f"mcp__{GATEWAY_NAME}__delete*"
    assert "--dangerously-skip-permissions" in build_command(AgentTask(prompt="x"))


# -- agent preflight and version --------------------------------------------------------------

def test_the_agent_version_is_recorded() -> None:
    h = make_harness(anthropic_api_key=MODEL_KEY)
    result = h.run(envs=FAST)
    assert result.ok and result.agent_version == SIM_CLAUDE_VERSION


def test_a_missing_cli_is_a_permanent_named_error() -> None:
    h = make_harness(anthropic_api_key=MODEL_KEY)
    result = h.run(envs={**FAST, "SIM_FAIL": "agent:missing"})
    assert result.error is not None
    assert result.error.category is ErrorCategory.AGENT_MISSING
    assert not result.error.retryable and result.attempts == 1
    assert "sandqueue template build" in result.error.message


# -- result classification --------------------------------------------------------------------

@pytest.mark.parametrize(("fail", "category", "retried"), [
    ("agent:overloaded", ErrorCategory.MODEL_UNAVAILABLE, True),
    ("agent:rate_limit", ErrorCategory.RATE_LIMITED, True),
    ("agent:auth", ErrorCategory.AUTH, False),
])
def test_api_errors_in_success_results_are_classified(fail: str, category: ErrorCategory,
                                                      retried: bool) -> None:
    h = make_harness(anthropic_api_key=MODEL_KEY)
    result = h.run(envs={**FAST, "SIM_FAIL": fail})
    assert result.error is not None and result.error.category is category
    assert result.subtype == "success" and result.is_error is True
    assert result.attempts == (3 if retried else 1)


def test_an_invalid_key_is_a_permanent_auth_error() -> None:
    h = make_harness(anthropic_api_key=BAD_KEY)
    result = h.run(envs=FAST)
    assert result.error is not None and result.error.category is ErrorCategory.AUTH
    assert result.attempts == 1


def test_an_oauth_token_alone_runs_the_agent() -> None:
    h = make_harness(claude_code_oauth_token="sk-ant-oat01-unit-test-token")
    result = h.run(envs=FAST)
    assert result.ok, result.error


@pytest.mark.parametrize(("result", "kind"), [
    ({"subtype": "success", "is_error": True, "api_error_status": 529,
      "result": "API Error: Repeated 529 Overloaded errors."}, errors.ModelUnavailable),
    ({"subtype": "success", "is_error": True, "api_error_status": 429,
      "result": "You've hit your session limit · resets 4:50pm"}, errors.RateLimited),
    ({"subtype": "success", "is_error": True, "api_error_status": None,
      "result": "Not logged in · Please run /login"}, errors.AuthError),
    ({"subtype": "error_max_turns", "is_error": True,
      "errors": ["Reached maximum number of turns (3)"]}, errors.MaxTurns),
    ({"subtype": "error_max_budget_usd", "is_error": True,
      "errors": ["Reached maximum budget ($1)"]}, errors.BudgetExceeded),
    ({"subtype": "error_during_execution", "is_error": True, "errors": ["[ede_diagnostic]"]},
     errors.AgentError),
])
def test_result_events_as_the_cli_prints_them_are_classified(
        result: dict[str, Any], kind: type[errors.SandqueueError]) -> None:
    got, text = classify_result({"type": "result", **result})
    assert got is kind
    assert text  # never empty: errors[] when there is no result text
