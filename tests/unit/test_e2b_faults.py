"""Faults of E2B and of the artifact store while a task's work is brought back (collect, the
session transcript), on the real `e2b` SDK over the fake cloud: the task's result is never
lost, every problem is a warning, and the sandbox is killed however it ends.

How the SDK reports them (installed e2b 2.63): a 429 from the edge on `/files` is
`RateLimitException` (e2b/envd/api.py `_DEFAULT_API_ERROR_MAP`), RESOURCE_EXHAUSTED on an
RPC the same (e2b/envd/rpc.py `_DEFAULT_RPC_ERROR_MAP`); a sandbox that is gone answers 502
"... was not found", which is `SandboxNotRunningException` (e2b/exceptions.py
`format_sandbox_unavailable_exception`)."""

from __future__ import annotations

import json
import re
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from sandqueue.artifacts import ArtifactLimits, LocalStore
from sandqueue.contract import AgentTask, RetryPolicy, TaskStatus
from tests.fakes.e2b_sdk import DIES, Exit, FakeE2BCloud, FakeEnvd, FakeProcess, Step
from tests.unit.test_e2b_pipeline import E2B_KEY, FakeClaude, Harness, make_settings
from worker.workspace import Workspace

ANSWER = "all done"


class WritingClaude(FakeClaude):
    """The fake CLI, plus what the real one leaves in the sandbox: its session transcript at
    `~/.claude/projects/<cwd, non-alphanumerics as '-'>/<session id>.jsonl` (code.claude.com
    docs sessions.md; research/claude-code-facts.md §7), and the files it was asked for."""

    def __init__(self, outputs: dict[str, bytes]) -> None:
        super().__init__("ok")
        self.outputs = outputs
        self.sessions: list[str] = []

    def _ok(self, proc: FakeProcess) -> Iterator[Step]:
        session = str(uuid.uuid4())
        self.sessions.append(session)
        cwd = proc.cwd or "/home/user"
        project = re.sub(r"[^A-Za-z0-9]", "-", cwd)
        proc.sandbox.files[f"/home/{proc.user}/.claude/projects/{project}/{session}.jsonl"] = (
            json.dumps({"type": "user", "sessionId": session}).encode() + b"\n")
        for name, data in self.outputs.items():
            proc.sandbox.files[f"{cwd}/{name}"] = data
        yield from self._emit(self._init(proc, session), self._text(session, ANSWER),
                              self._result(session, ANSWER))
        yield Exit(0)


OUTPUTS = {"out/a.md": b"# a\n", "out/b.md": b"# b\n"}


def harness(cloud: FakeE2BCloud, tmp_path: Path) -> tuple[Harness, WritingClaude]:
    claude = WritingClaude(OUTPUTS)
    h = Harness(cloud, claude, settings=make_settings())
    limits = ArtifactLimits(max_file_bytes=h.pipeline.settings.artifact_max_file_bytes)
    h.pipeline._artifacts = LocalStore(tmp_path, limits)
    return h, claude


def task(**fields: Any) -> AgentTask:
    return AgentTask(prompt="write the report", collect=["out/*.md"],
                     retry=RetryPolicy(max_attempts=1), **fields)


def on_create(cloud: FakeE2BCloud, setup: Any) -> None:
    def hook(envd: FakeEnvd) -> None:
        setup(envd)
    cloud.on_create.append(hook)


def rate_limited() -> httpx.Response:
    return httpx.Response(429, json={"code": 429, "message": "rate limit exceeded"})


@pytest.fixture
def cloud() -> FakeE2BCloud:
    return FakeE2BCloud(api_key=E2B_KEY)


def test_everything_works_without_faults(cloud: FakeE2BCloud, tmp_path: Path) -> None:
    """The baseline the fault tests depart from: two files and the transcript come back."""
    h, claude = harness(cloud, tmp_path)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert {a.name for a in result.artifacts} == {"files/out/a.md", "files/out/b.md"}
    assert result.transcript is not None
    assert result.transcript.name == f"session/{claude.sessions[0]}.jsonl"
    assert result.warnings == []
    h.assert_all_killed()


def test_a_rate_limited_download_loses_one_file_not_the_result(cloud: FakeE2BCloud,
                                                               tmp_path: Path) -> None:
    on_create(cloud, lambda envd: envd.read_failures.append(rate_limited()))
    h, _ = harness(cloud, tmp_path)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED and result.result == ANSWER
    assert any("collected files" in w and "rate limit" in w for w in result.warnings), \
        result.warnings
    assert result.transcript is not None  # the steps after it still ran
    h.assert_all_killed()


def test_a_rate_limited_listing_is_a_warning(cloud: FakeE2BCloud, tmp_path: Path) -> None:
    on_create(cloud, lambda envd: envd.list_failures.append(
        ConnectError(Code.RESOURCE_EXHAUSTED, "too many requests")))
    h, _ = harness(cloud, tmp_path)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED
    assert result.artifacts == []
    assert any("rate limit" in w for w in result.warnings), result.warnings
    h.assert_all_killed()


def test_a_rate_limited_transcript_save_says_the_task_cannot_be_continued(
        cloud: FakeE2BCloud, tmp_path: Path) -> None:
    # the two collected files, then the transcript
    on_create(cloud, lambda envd: envd.read_failures.extend([
        httpx.Response(200, content=b"# a\n"), httpx.Response(200, content=b"# b\n"),
        rate_limited()]))
    h, _ = harness(cloud, tmp_path)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED and result.result == ANSWER
    assert len(result.artifacts) == 2
    assert result.transcript is None
    assert any("cannot be continued" in w and "rate limit" in w for w in result.warnings)
    h.assert_all_killed()


def test_a_sandbox_dying_mid_collect_keeps_what_came_back(cloud: FakeE2BCloud,
                                                          tmp_path: Path) -> None:
    """The sandbox dies (killed, or its E2B timeout) between two downloads: the first file is
    kept, the rest and the transcript are warnings, the result stands, the kill is harmless."""
    on_create(cloud, lambda envd: envd.read_failures.extend(
        [httpx.Response(200, content=b"# a\n"), DIES]))
    h, _ = harness(cloud, tmp_path)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED and result.result == ANSWER
    assert [a.name for a in result.artifacts] == ["files/out/a.md"]
    assert any("collected files" in w and "not found" in w for w in result.warnings), \
        result.warnings
    assert result.transcript is None
    assert any("cannot be continued" in w for w in result.warnings)
    h.assert_all_killed()


def test_an_artifact_store_that_fails_on_the_transcript_keeps_the_result(
        cloud: FakeE2BCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local store whose disk is full (OSError, not an ArtifactError) when the transcript
    is saved: the saving is best effort, as collecting is."""
    h, _ = harness(cloud, tmp_path)
    store = h.pipeline._artifacts
    assert store is not None
    real_put = store.put

    def put(task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("session/"):
            raise OSError(28, "No space left on device")
        return real_put(task_id, name, *args, **kwargs)

    monkeypatch.setattr(store, "put", put)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.result == ANSWER and len(result.artifacts) == 2
    assert result.transcript is None
    assert any("cannot be continued" in w and "No space left" in w for w in result.warnings)
    h.assert_all_killed()


def test_forgetting_an_earlier_attempts_artifacts_never_fails_the_collect(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`forget` runs in the `finally` that collects: an OSError of the local store's delete
    (a read-only or vanished directory) must not replace the task's outcome."""
    store = LocalStore(tmp_path)
    ref = store.put("t1", "files/a.md", b"a")
    workspace = Workspace(make_settings(), store, {})

    def delete(task_id: str, name: str | None = None) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "delete", delete)
    workspace.forget("t1", [ref])  # logged, not raised


def test_an_outage_during_collect_and_transcript_save_keeps_the_result(
        cloud: FakeE2BCloud, tmp_path: Path) -> None:
    """Downloads fail at the connection level (an outage between worker and sandbox): the
    SDK probes the sandbox's health and, the sandbox answering, raises the transport error
    as is (e2b/envd/api.py `handle_envd_api_transport_exception_with_health`; with no
    answer, SandboxUnreachableException). One failed download ends the collecting (not one
    retry per file against a dead link); the result stands."""
    def outage(envd: FakeEnvd) -> None:
        envd.read_failures.extend([httpx.ConnectError("connection refused")] * 2)
    on_create(cloud, outage)
    h, _ = harness(cloud, tmp_path)
    result = h.run(task(mcp={}))
    assert result.status is TaskStatus.SUCCEEDED and result.result == ANSWER
    assert result.artifacts == [] and result.transcript is None
    assert any("collected files" in w for w in result.warnings), result.warnings
    assert any("cannot be continued" in w for w in result.warnings)
    (envd,) = cloud.created
    assert envd.read_failures == deque()  # two downloads were tried, not one per file more
    h.assert_all_killed()
