"""The task/result contract: what a producer may send, and that it survives the wire intact."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads
from pydantic import ValidationError

from sandqueue.contract import (
    MAX_PROMPT_BYTES,
    RESERVED_ENVS,
    AgentResult,
    AgentTask,
    McpServerStatus,
    RetryPolicy,
    TaskError,
    TaskMessage,
    TaskStatus,
    Timings,
    ToolCallCount,
)

GH_TOKEN_REF = "${GITHUB_TOKEN}"


def _error_text(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    """All messages of a ValidationError on one line, so assertions ignore wrapping."""
    return " ".join(" ".join(str(e["msg"]) for e in exc.value.errors()).split())


def _refused(**fields: Any) -> str:
    with pytest.raises(ValidationError) as exc:
        AgentTask(**fields)
    return _error_text(exc)


# -- prompt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", " ", "\n\t  \r\n", "\u3000\u2003"])
def test_blank_prompt_is_refused(prompt: str) -> None:
    assert "prompt is empty" in _refused(prompt=prompt)


def test_prompt_at_the_byte_limit_is_accepted() -> None:
    assert len(AgentTask(prompt="a" * MAX_PROMPT_BYTES).prompt) == MAX_PROMPT_BYTES


def test_prompt_one_byte_over_the_limit_is_refused() -> None:
    message = _refused(prompt="a" * (MAX_PROMPT_BYTES + 1))
    assert f"{MAX_PROMPT_BYTES + 1} bytes" in message
    assert str(MAX_PROMPT_BYTES) in message


def test_prompt_limit_counts_utf8_bytes_not_characters() -> None:
    # Given a prompt of 3-byte characters: far fewer characters than the limit, more bytes
    prompt = "€" * (MAX_PROMPT_BYTES // 3 + 1)
    assert len(prompt) < MAX_PROMPT_BYTES < len(prompt.encode())
    # Then it is refused, and the message gives the byte size
    assert f"{len(prompt.encode())} bytes" in _refused(prompt=prompt)


def test_multibyte_prompt_exactly_at_the_limit_is_accepted() -> None:
    prompt = "é" * (MAX_PROMPT_BYTES // 2)
    assert len(prompt.encode()) == MAX_PROMPT_BYTES
    assert AgentTask(prompt=prompt).prompt == prompt


def test_system_prompt_over_its_limit_is_refused() -> None:
    assert "append_system_prompt" in _refused(prompt="x", append_system_prompt="a" * 70_000)


# -- MCP servers from the catalog -------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("githubOffical", "githubOfficial"), ("githubofficial", "githubOfficial"),
     ("notoin", "notion"), ("Notion", "notion")],
)
def test_unknown_mcp_server_names_the_closest_catalog_names(typo: str, suggestion: str) -> None:
    message = _refused(prompt="x", mcp={typo: {}})
    assert f"unknown MCP server {typo!r}" in message
    assert "did you mean" in message
    hint = message.split("did you mean", 1)[1].split("?", 1)[0]
    assert suggestion in [name.strip() for name in hint.split(",")]


def test_unknown_mcp_server_far_from_everything_says_how_to_name_custom_ones() -> None:
    message = _refused(prompt="x", mcp={"zzqqxxyyww": {}})
    assert "did you mean" not in message
    assert "github/<owner>/<repo>" in message


def test_missing_required_key_says_how_to_give_it() -> None:
    message = _refused(prompt="x", mcp={"githubOfficial": {}})
    assert "githubPersonalAccessToken" in message
    assert "--mcp-config githubOfficial.githubPersonalAccessToken=" in message


def test_required_key_given_as_env_reference_is_accepted() -> None:
    task = AgentTask(prompt="x", mcp={"githubOfficial": {"githubPersonalAccessToken":
                                                         GH_TOKEN_REF}})
    assert task.mcp["githubOfficial"]["githubPersonalAccessToken"] == GH_TOKEN_REF


def test_env_reference_is_allowed_for_non_string_types() -> None:
    task = AgentTask(prompt="x", mcp={"jetbrains": {"port": "${JB_PORT}"}})
    assert task.mcp["jetbrains"]["port"] == "${JB_PORT}"


def test_unknown_key_is_refused_with_the_known_keys() -> None:
    message = _refused(prompt="x", mcp={"notion": {"internalIntegrationToken": "${T}",
                                                   "workspace": "w"}})
    assert "unknown key(s) ['workspace']" in message
    assert "internalIntegrationToken" in message


@pytest.mark.parametrize(
    ("mcp", "expected"),
    [
        ({"jetbrains": {"port": "8080"}}, "mcp.jetbrains.port must be int, got str"),
        ({"jetbrains": {"port": True}}, "mcp.jetbrains.port must be int, got bool"),
        ({"jetbrains": {"port": 1.5}}, "mcp.jetbrains.port must be int, got float"),
        ({"filesystem": {"paths": "/tmp"}}, "mcp.filesystem.paths must be list, got str"),
        ({"filesystem": {"paths": ["/tmp", 3]}}, "mcp.filesystem.paths must be a list of strings"),
        ({"notion": {"internalIntegrationToken": 12345}},
         "mcp.notion.internalIntegrationToken must be str, got int"),
    ],
)
def test_wrong_value_types_are_refused(mcp: dict[str, Any], expected: str) -> None:
    assert expected in _refused(prompt="x", mcp=mcp)


def test_right_value_types_are_accepted() -> None:
    task = AgentTask(prompt="x", mcp={"jetbrains": {"port": 8080},
                                      "filesystem": {"paths": ["/a", "/b"]}})
    assert task.mcp["jetbrains"]["port"] == 8080


@pytest.mark.parametrize("value", ["${1ABC}", "${FOO", "${FOO-BAR}", "${}", "${ FOO}",
                                   "${FOO}x"])
def test_malformed_env_reference_is_refused(value: str) -> None:
    message = _refused(prompt="x", mcp={"notion": {"internalIntegrationToken": value}})
    assert "not a valid environment reference" in message


def test_mcp_config_must_be_an_object() -> None:
    with pytest.raises(ValidationError):
        AgentTask.model_validate({"prompt": "x", "mcp": {"notion": "token"}})


def test_free_form_catalog_server_takes_any_settings() -> None:
    task = AgentTask(prompt="x", mcp={"amazonBedrockAgentcore": {"anything": [1, 2]}})
    assert "amazonBedrockAgentcore" in task.mcp


def test_more_than_fifty_servers_are_refused() -> None:
    many = {f"github/o/r{i}": {"run_cmd": "x"} for i in range(51)}
    assert "at most 50" in _refused(prompt="x", mcp=many)


# -- custom github/<owner>/<repo> servers -----------------------------------------------------


def test_custom_github_server_with_all_keys_is_accepted() -> None:
    config = {"run_cmd": "npx -y .", "install_cmd": "npm ci", "envs": {"API_KEY": "${ACME}"}}
    task = AgentTask(prompt="x", mcp={"github/acme/tools.js": config})
    assert task.mcp["github/acme/tools.js"] == config


@pytest.mark.parametrize(
    ("name", "config", "expected"),
    [
        ("github/acme", {"run_cmd": "x"}, "custom servers are named github/<owner>/<repo>"),
        ("github/a/b/c", {"run_cmd": "x"}, "custom servers are named github/<owner>/<repo>"),
        ("github/a b/c", {"run_cmd": "x"}, "custom servers are named github/<owner>/<repo>"),
        ("github/a/b", {}, "needs run_cmd"),
        ("github/a/b", {"run_cmd": 3}, "needs run_cmd"),
        ("github/a/b", {"run_cmd": "x", "cmd": "y"}, "unknown keys ['cmd']"),
        ("github/a/b", {"run_cmd": "x", "install_cmd": ["npm"]}, "install_cmd must be a string"),
        ("github/a/b", {"run_cmd": "x", "envs": ["A=1"]}, "envs must map names to string"),
        ("github/a/b", {"run_cmd": "x", "envs": {"A": 1}}, "envs must map names to string"),
    ],
)
def test_bad_custom_github_server_is_refused(name: str, config: dict[str, Any],
                                             expected: str) -> None:
    assert expected in _refused(prompt="x", mcp={name: config})


# -- names must be whole-line matches -----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"envs": {"FOO\n": "1"}}, id="env-name"),
        pytest.param({"mcp": {"notion": {"internalIntegrationToken": "${TOKEN}\n"}}},
                     id="env-reference"),
        pytest.param({"mcp": {"github/acme/tools\n": {"run_cmd": "x"}}}, id="github-name"),
    ],
)
def test_a_trailing_newline_does_not_make_a_valid_name(fields: dict[str, Any]) -> None:
    # Python's `$` also matches before a final newline; re.fullmatch / `\Z` does not.
    with pytest.raises(ValidationError):
        AgentTask(prompt="x", **fields)


# -- envs, tools, extra fields --------------------------------------------------------------------


def _env_id(name: str) -> str:
    # ids stay clear of "e2b": the unit suite is run with -k "not e2b"
    return name.lower().replace("e2b", "sandbox")


@pytest.mark.parametrize("name", sorted(RESERVED_ENVS), ids=_env_id)
def test_reserved_envs_are_refused(name: str) -> None:
    assert "set by the worker" in _refused(prompt="x", envs={name: "v"})


@pytest.mark.parametrize("name", ["CLAUDE_CONFIG_DIR", "CLAUDE_CODE_PROJECT_DIR_NAME"])
def test_envs_that_move_the_session_transcripts_are_refused(name: str) -> None:
    """The worker saves the transcript at ~/.claude/projects/<cwd>/<id>.jsonl; these move it
    (the simulated CLI follows CLAUDE_CONFIG_DIR too), which would lose follow-ups silently."""
    assert "session transcripts" in _refused(prompt="x", envs={name: "/tmp/elsewhere"})


@pytest.mark.parametrize("name", ["1ABC", "A-B", "", "A B", "Ä"])
def test_invalid_env_names_are_refused(name: str) -> None:
    assert "not a valid environment variable name" in _refused(prompt="x", envs={name: "v"})


def test_plain_envs_are_accepted() -> None:
    assert AgentTask(prompt="x", envs={"SIM_FAIL": "agent:hang", "_x1": ""}).envs["_x1"] == ""


@pytest.mark.parametrize(
    ("model", "payload"),
    [
        (AgentTask, {"prompt": "x", "promt": "typo"}),
        (TaskMessage, {"task": {"prompt": "x"}, "priority": 1}),
        (TaskMessage, {"task": {"prompt": "x", "unknown": 1}}),
        (RetryPolicy, {"max_attempts": 2, "retries": 3}),
    ],
)
def test_unknown_fields_are_refused(model: type[AgentTask | TaskMessage | RetryPolicy],
                                    payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(payload)
    assert any(e["type"] == "extra_forbidden" for e in exc.value.errors())


def test_a_tool_both_allowed_and_disallowed_is_refused() -> None:
    message = _refused(prompt="x", allowed_tools=["Bash", "Read"],
                       disallowed_tools=["Bash", "Write"])
    assert "both allowed and disallowed" in message
    assert "Bash" in message
    assert "Read" not in message


@pytest.mark.parametrize(
    "fields",
    [{"max_turns": 0}, {"timeout_s": 0}, {"timeout_s": 10**6}, {"allowed_tools": [""]},
     {"retry": {"max_attempts": 0}}, {"max_cost_usd": -1}, {"model": "m" * 201},
     {"labels": {"k": "v" * 257}}],
)
def test_out_of_range_fields_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AgentTask(prompt="x", **fields)


def test_message_version_must_be_one() -> None:
    with pytest.raises(ValidationError):
        TaskMessage.model_validate({"v": 2, "task": {"prompt": "x"}})


# -- round trips ------------------------------------------------------------------------------

TRICKY = [
    "it's \"quoted\" `backticked` $(rm -rf /) ${HOME} \\n not a newline",
    "line one\nline two\r\nline three\rend\n\n",
    "héllo wörld ✓ 日本語 🎉 \u202eRTL\u200b zero-width",
    "'; DROP TABLE tasks; --",
    "\x00\x01\x7f control characters",
    "   padded   ",
]


def _wire(message: TaskMessage, *, exclude_defaults: bool) -> TaskMessage:
    """What a producer sends and a worker validates, through kombu's JSON as on the broker."""
    body = message.model_dump(mode="json", exclude_defaults=exclude_defaults)
    return TaskMessage.model_validate(kombu_loads(kombu_dumps(body)))


@given(st.text(min_size=1, max_size=3000).filter(lambda s: bool(s.strip())))
@example(TRICKY[0])
@example(TRICKY[1])
@example(TRICKY[2])
@example(TRICKY[3])
@example(TRICKY[4])
@example(TRICKY[5])
def test_any_prompt_round_trips_through_the_message_json_exactly(prompt: str) -> None:
    message = TaskMessage(task=AgentTask(prompt=prompt, labels={"k": prompt[:256]}))
    for exclude_defaults in (False, True):
        back = _wire(message, exclude_defaults=exclude_defaults)
        assert back.task.prompt == prompt
        assert back == message
    plain = TaskMessage.model_validate(json.loads(json.dumps(message.model_dump(mode="json"))))
    assert plain.task.prompt == prompt


def test_full_task_round_trips_with_every_field() -> None:
    task = AgentTask(
        prompt=TRICKY[0], mcp={"githubOfficial": {"githubPersonalAccessToken": GH_TOKEN_REF},
                               "jetbrains": {"port": 63342},
                               "github/acme/tools": {"run_cmd": "npx .", "envs": {"A": "b"}}},
        model="claude-sonnet-4-5", max_turns=7, allowed_tools=["Read"],
        disallowed_tools=["Bash"], append_system_prompt="be brief", timeout_s=120.5,
        template="tpl", envs={"SIM_LATENCY_S": "0"}, labels={"team": "a"},
        idempotency_key="k1", retry=RetryPolicy(max_attempts=5, retry_after_side_effects=True),
        max_cost_usd=1.25,
    )
    message = TaskMessage(task=task, submitted_at=1700000000.25)
    assert _wire(message, exclude_defaults=True) == message
    assert _wire(message, exclude_defaults=False) == message


_FIELDS = sorted(AgentTask.model_fields)
_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
            | st.sampled_from(["${X}", "${", "github/a/b", "githubOfficial", "notion", " "]))
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(_FIELDS), inner, max_size=4),
    max_leaves=16,
)
_mcp = st.dictionaries(
    st.sampled_from(["githubOfficial", "notion", "jetbrains", "filesystem", "github/a/b",
                     "github/x", "amazonBedrockAgentcore", ""]) | st.text(max_size=10),
    _json, max_size=3,
)
_task = st.dictionaries(
    st.sampled_from(_FIELDS) | st.text(max_size=6),
    _json | _mcp | st.text(max_size=30),
    max_size=6,
) | st.fixed_dictionaries({"prompt": _json | st.text(), "mcp": _mcp | _json},
                          optional={"retry": _json, "envs": _json, "labels": _json})
_junk = st.dictionaries(
    st.sampled_from(["v", "task", "submitted_at"]) | st.text(max_size=6),
    _json | _task,
    max_size=4,
) | st.fixed_dictionaries({"task": _task}, optional={"v": _json, "submitted_at": _json})


@given(_junk)
def test_junk_messages_raise_validation_error_and_nothing_else(junk: dict[str, Any]) -> None:
    try:
        message = TaskMessage.model_validate(junk)
    except ValidationError:
        return
    assert message.task.prompt.strip()  # whatever passes is a usable task


def test_agent_result_round_trips_through_json() -> None:
    result = AgentResult(
        task_id="t-1", status=TaskStatus.FAILED, result=TRICKY[2], is_error=True,
        subtype="error_max_turns", num_turns=3, total_cost_usd=0.0123,
        usage={"input_tokens": 10, "nested": {"a": [1, 2]}}, session_id="s",
        timings=Timings(queued_s=0.1, sandbox_create_s=1.5, total_s=9.0), attempts=2,
        sandbox_id="sim-1", mcp_servers=[McpServerStatus(name="gw", status="connected")],
        tool_calls=[ToolCallCount(name="Bash", count=2), ToolCallCount(name="Read", count=1)],
        error=TaskError(category="agent_error", message="boom", retryable=False),
        simulated=True, labels={"team": "a"}, finished_at=1700000000.5,
    )
    assert AgentResult.model_validate_json(result.model_dump_json()) == result
    via_dict = AgentResult.model_validate(json.loads(json.dumps(result.model_dump(mode="json"))))
    assert via_dict == result
    assert via_dict.status is TaskStatus.FAILED
    assert via_dict.tool_call_total == 3
    assert not via_dict.ok


def test_agent_result_ignores_fields_it_does_not_know() -> None:
    # results written by a newer worker stay readable by an older producer
    result = AgentResult.model_validate({"task_id": "t", "status": "succeeded", "new": 1})
    assert result.ok


def test_final_statuses() -> None:
    assert {s for s in TaskStatus if s.is_final} == {
        TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED}


def test_agent_options_name_real_fields_and_the_adapter_reads_only_those() -> None:
    import ast
    from pathlib import Path

    from sandqueue.contract import AGENT_OPTIONS

    assert set(AGENT_OPTIONS) <= set(AgentTask.model_fields)
    source = (Path(__file__).resolve().parents[2] / "worker/agent/claude_code.py").read_text()
    read = {node.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "task"}
    assert read <= {*AGENT_OPTIONS, "prompt", "max_cost_usd"}, read
