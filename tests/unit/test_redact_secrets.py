"""Secrets a task uses are resolved on the worker and masked in everything that leaves it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from sandqueue import errors
from sandqueue.contract import (
    AgentResult,
    ErrorCategory,
    McpServerStatus,
    TaskError,
    TaskStatus,
    ToolCallCount,
)
from worker.credentials import INLINE_SECRET_MIN_CHARS, resolve_mcp
from worker.redact import MASK, MIN_SECRET_CHARS, Redactor

# -- Redactor.text ------------------------------------------------------------------------------


def test_every_occurrence_is_replaced() -> None:
    out = Redactor(["tok-123"]).text("tok-123tok-123 and tok-123.")
    assert out == f"{MASK}{MASK} and {MASK}."


def test_longest_secret_is_replaced_first() -> None:
    # Given a secret that contains another: replacing the short one first would leave "-extra"
    redactor = Redactor(["secret", "secret-extra"])
    assert redactor.text("a secret-extra b secret") == f"a {MASK} b {MASK}"


def test_overlapping_secrets_leave_neither_whole() -> None:
    out = Redactor(["abcdef", "defghi"]).text("xx abcdefghi yy")
    assert "abcdef" not in out and "defghi" not in out
    assert out.startswith("xx ") and out.endswith(" yy")


@pytest.mark.parametrize("short", ["", "a", "ab", "abc"])
def test_values_under_four_characters_are_not_secrets(short: str) -> None:
    text = "abc ab a 123"
    assert Redactor([short, None]).text(text) == text  # type: ignore[list-item]


def test_four_characters_are_enough() -> None:
    assert MIN_SECRET_CHARS == 4
    assert Redactor(["abcd"]).text("xabcdx") == f"x{MASK}x"


def test_add_ignores_duplicates_and_empty_values() -> None:
    redactor = Redactor()
    redactor.add("key-1", None, "", "key-1", "key-22")
    assert redactor.text("key-1 key-22") == f"{MASK} {MASK}"


@given(
    text=st.text(alphabet="abcd -", max_size=80),
    secrets=st.lists(st.text(alphabet="abcd", min_size=1, max_size=8), max_size=5),
)
def test_no_secret_survives_redaction(text: str, secrets: list[str]) -> None:
    out = Redactor(secrets).text(text)
    for secret in secrets:
        if len(secret) >= MIN_SECRET_CHARS:
            assert secret not in out
    if not any(len(s) >= MIN_SECRET_CHARS and s in text for s in secrets):
        assert out == text  # nothing to hide: nothing changes


# -- nested values and models -------------------------------------------------------------------


def test_nested_dicts_lists_and_tuples_are_redacted() -> None:
    value = {"a": ["x hunter22 y", {"b": ("hunter22", 5, None, 1.5, True)}],
             "c": {"d": {"e": "hunter22hunter22"}}, "n": 7}
    out = Redactor(["hunter22"]).deep(value)
    assert out == {"a": [f"x {MASK} y", {"b": [MASK, 5, None, 1.5, True]}],
                   "c": {"d": {"e": MASK + MASK}}, "n": 7}
    assert value["c"] == {"d": {"e": "hunter22hunter22"}}  # the input is left alone


class _Inner(BaseModel):
    note: str
    items: list[str]


class _Outer(BaseModel):
    title: str
    inner: _Inner
    extra: dict[str, Any]


def test_a_pydantic_model_is_redacted_into_a_new_model_of_its_type() -> None:
    model = _Outer(title="pw=s3cr3t!", inner=_Inner(note="s3cr3t!", items=["a", "s3cr3t!"]),
                   extra={"k": ["s3cr3t!"]})
    out = Redactor(["s3cr3t!"]).model(model)
    assert type(out) is _Outer
    assert out.title == f"pw={MASK}"
    assert out.inner.items == ["a", MASK]
    assert "s3cr3t!" not in out.model_dump_json()
    assert model.title == "pw=s3cr3t!"


def test_a_result_is_redacted_everywhere_a_secret_can_hide() -> None:
    secret = "sk-ant-api03-abcdef"
    result = AgentResult(
        task_id="t1", status=TaskStatus.FAILED, result=f"key is {secret}",
        usage={"note": secret}, labels={"who": secret},
        mcp_servers=[McpServerStatus(name="gw", status="connected")],
        tool_calls=[ToolCallCount(name="Bash", count=1)],
        error=TaskError(category=ErrorCategory.AUTH, message=f"bad key {secret}",
                        retryable=False),
    )
    out = Redactor([secret]).model(result)
    assert secret not in out.model_dump_json()
    assert out.error is not None and out.error.message == f"bad key {MASK}"
    assert out.status is TaskStatus.FAILED
    assert out.tool_calls == result.tool_calls


def test_without_secrets_the_model_is_returned_as_is() -> None:
    result = AgentResult(task_id="t", status=TaskStatus.SUCCEEDED)
    assert Redactor().model(result) is result


@pytest.mark.parametrize("secret", ["error", "name", "failed"])
def test_a_secret_that_equals_a_field_name_or_enum_value_keeps_the_result_intact(
    secret: str,
) -> None:
    # A resolved ${ENV} value only has to be 4 characters long to be a secret; redacting the
    # result must mask text, never rename fields or invalidate enum values.
    result = AgentResult(
        task_id="t1", status=TaskStatus.FAILED, result=f"it said {secret}",
        tool_calls=[ToolCallCount(name="Bash", count=2)],
        error=TaskError(category=ErrorCategory.AGENT_ERROR, message="agent error",
                        retryable=False),
    )
    out = Redactor([secret]).model(result)
    assert out.status is TaskStatus.FAILED
    assert out.error is not None and out.error.category is ErrorCategory.AGENT_ERROR
    assert out.tool_calls == [ToolCallCount(name="Bash", count=2)]
    assert out.task_id == "t1"
    assert out.result == f"it said {MASK}"


# -- resolve_mcp ----------------------------------------------------------------------------------


def test_references_are_resolved_from_the_given_environment_at_any_depth() -> None:
    mcp = {
        "notion": {"internalIntegrationToken": "${NOTION_TOKEN}"},
        "filesystem": {"paths": ["/a", "${DATA_DIR}"]},
        "github/o/r": {"run_cmd": "npx .", "envs": {"API_KEY": "${ACME_KEY}"}},
        "jetbrains": {"port": 63342},
    }
    environ = {"NOTION_TOKEN": "ntn_abc123", "DATA_DIR": "/srv/data", "ACME_KEY": "acme-999",
               "UNUSED": "unused-value"}
    resolved, secrets = resolve_mcp(mcp, environ)
    assert resolved == {
        "notion": {"internalIntegrationToken": "ntn_abc123"},
        "filesystem": {"paths": ["/a", "/srv/data"]},
        "github/o/r": {"run_cmd": "npx .", "envs": {"API_KEY": "acme-999"}},
        "jetbrains": {"port": 63342},
    }
    assert {"ntn_abc123", "/srv/data", "acme-999"} <= set(secrets)
    assert "unused-value" not in secrets
    assert mcp["notion"]["internalIntegrationToken"] == "${NOTION_TOKEN}"  # input untouched


def test_missing_variable_raises_mcp_config_error_naming_it() -> None:
    mcp = {"notion": {"internalIntegrationToken": "${NOTION_TOKEN}"}}
    with pytest.raises(errors.McpConfigError) as exc:
        resolve_mcp(mcp, {"OTHER": "other-secret-value"})
    message = exc.value.message
    assert "NOTION_TOKEN" in message
    assert "mcp.notion.internalIntegrationToken" in message
    assert "other-secret-value" not in message
    assert exc.value.category is ErrorCategory.MCP_CONFIG
    assert not exc.value.retryable


def test_a_missing_variable_in_a_list_is_located() -> None:
    with pytest.raises(errors.McpConfigError, match=r"mcp\.filesystem\.paths\[1\]"):
        resolve_mcp({"filesystem": {"paths": ["/a", "${DATA_DIR}"]}}, {})


def test_only_whole_values_are_references() -> None:
    resolved, _ = resolve_mcp({"github/o/r": {"run_cmd": "run --token ${TOKEN}"}}, {})
    assert resolved["github/o/r"]["run_cmd"] == "run --token ${TOKEN}"


def test_inline_strings_long_enough_are_secrets_too() -> None:
    long_inline = "x" * INLINE_SECRET_MIN_CHARS
    short_inline = "y" * (INLINE_SECRET_MIN_CHARS - 1)
    _, secrets = resolve_mcp({"a": {"k": long_inline, "s": short_inline, "n": 12345678,
                                    "b": True}}, {})
    assert secrets == [long_inline]


def test_resolved_values_feed_the_redactor() -> None:
    _, secrets = resolve_mcp({"notion": {"internalIntegrationToken": "${T}"}},
                             {"T": "ntn_secret_42"})
    assert Redactor(secrets).text("token ntn_secret_42 leaked") == f"token {MASK} leaked"
