"""Random and malformed payloads at submit: a clear InvalidTask, never another exception."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from producer.api import Client
from sandqueue import errors
from sandqueue.contract import AgentTask
from sandqueue.settings import Settings

CLIENT = Client(Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0"))

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=12)
field_names = st.sampled_from(sorted(AgentTask.model_fields)) | st.text(max_size=12)


@given(st.dictionaries(field_names, values, max_size=6))
def test_random_task_dicts_are_valid_or_invalid_task(payload: dict[str, Any]) -> None:
    try:
        task = CLIENT.prepare(payload)
    except errors.InvalidTask as e:
        assert e.message.startswith("invalid task") or "timeout_s" in e.message
        return
    assert isinstance(task, AgentTask)


@given(st.dictionaries(st.text(max_size=20), st.dictionaries(st.text(max_size=20), values,
                                                               max_size=3), max_size=3))
def test_random_mcp_configs_are_refused_with_a_message(mcp: dict[str, Any]) -> None:
    try:
        CLIENT.prepare({"prompt": "hi", "mcp": mcp})
    except errors.InvalidTask as e:
        assert "mcp" in e.message
        return


@given(st.text(min_size=1, max_size=50).filter(str.strip), st.integers(1, 5))
def test_huge_fields_are_refused_not_truncated(word: str, scale: int) -> None:
    huge = word * (300_000 * scale // len(word) + 1)
    try:
        CLIENT.prepare({"prompt": huge})
    except errors.InvalidTask as e:
        assert "bytes" in e.message
    else:
        raise AssertionError("an oversized prompt was accepted")
