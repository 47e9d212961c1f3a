"""Session transcripts in the pipeline: saved after every run where the agent keeps them,
beside the task's artifacts (not among them), one per task (the last attempt's), restored
byte-exact for a follow-up, and refused when they changed since."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from sandqueue.artifacts import ArtifactLimits, LocalStore
from sandqueue.contract import (
    AgentResult,
    AgentTask,
    ErrorCategory,
    ParentSession,
    TaskMessage,
    TaskStatus,
    session_store_key,
)
from tests.unit.test_pipeline_sim import MODEL_KEY, Harness, make_harness
from worker.pipeline import TaskContext

FAST = {"SIM_LATENCY_S": "0.01"}


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    h = make_harness(anthropic_api_key=MODEL_KEY)
    h.pipeline._artifacts = LocalStore(tmp_path / "artifacts")
    return h


def store(h: Harness) -> LocalStore:
    assert isinstance(h.pipeline._artifacts, LocalStore)
    return h.pipeline._artifacts


def test_a_retried_task_keeps_the_last_attempts_transcript_only(harness: Harness) -> None:
    result = harness.run(envs={**FAST, "SIM_FAIL": "agent:overloaded:1"})
    assert result.status is TaskStatus.SUCCEEDED and result.agent_runs == 2
    assert result.transcript is not None
    assert result.transcript.name == f"session/{result.session_id}.jsonl"
    kept = store(harness).list(session_store_key(result.task_id))
    assert kept == [result.transcript]
    assert result.artifacts == []  # not a file the task brought back
    assert store(harness).list(result.task_id) == []


def test_a_follow_up_gets_the_transcript_byte_exact_and_refuses_a_changed_one(
        harness: Harness) -> None:
    first = harness.run("Remember 42.", envs=FAST)
    assert first.transcript is not None and first.session_id is not None
    saved = store(harness).get(session_store_key(first.task_id), first.transcript.name)
    parent = ParentSession(task_id=first.task_id, session_id=first.session_id,
                           transcript=first.transcript.name, sha256=first.transcript.sha256,
                           cwd=first.agent_cwd)

    second = _continue(harness, parent)
    assert second.status is TaskStatus.SUCCEEDED, second.error
    assert second.session_id == first.session_id
    digest = hashlib.sha256(saved).hexdigest()
    assert f"from a transcript of {len(saved)} bytes (sha256 {digest})" in (second.result or "")

    store(harness).put(session_store_key(first.task_id), first.transcript.name, b"{}\n")
    third = _continue(harness, parent)
    assert third.error is not None and third.error.category is ErrorCategory.INVALID_TASK
    assert "changed in the artifact store" in third.error.message


def _continue(harness: Harness, parent: ParentSession) -> AgentResult:
    task = AgentTask(prompt="What was it?", parent_id=parent.task_id, envs=FAST)
    now = time.time()
    ctx = TaskContext(task_id=f"follow-{now}", started_at=now, deadline_at=now + 60,
                      message=TaskMessage(task=task, submitted_at=now, parent=parent))
    return harness.pipeline.run(ctx)


def test_a_transcript_cut_by_the_task_byte_limit_names_that_limit(tmp_path: Path) -> None:
    """The warning names the setting that cut it, and its size when known exactly."""
    h = make_harness(anthropic_api_key=MODEL_KEY)
    h.pipeline._artifacts = LocalStore(tmp_path / "artifacts",
                                       ArtifactLimits(max_file_bytes=10_000, max_task_bytes=50))
    result = h.run(envs=FAST)
    assert result.transcript is not None and result.transcript.truncated
    (warning,) = [w for w in result.warnings if "transcript" in w]
    assert "SANDQUEUE_ARTIFACT_MAX_TASK_BYTES" in warning
    assert f"({result.transcript.original_size} bytes)" in warning
