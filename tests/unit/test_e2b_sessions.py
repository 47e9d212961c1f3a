"""Follow-up turns on the real `e2b` SDK over the fake cloud: the transcript Claude Code left
in one sandbox comes back byte-exact into another (on another pipeline, as on another worker),
at the path the CLI looks in, owned by the user it runs as, and the CLI is resumed there.

Claude Code's facts (research/claude-code-facts.md §7; code.claude.com docs sessions.md,
agent-sdk/sessions.md "Resume across hosts", headless.md): the transcript is
`~/.claude/projects/<cwd, every non-alphanumeric as '-'>/<session id>.jsonl`; `--resume <id>`
in `-p` keeps the id; before 2.1.223 it looks only in the current cwd's project, and an
unknown id ends `error_during_execution` "No conversation found with session ID: <id>", exit 1.
HOME is the passwd home of the user envd runs the command as (e2b-dev/infra
packages/envd/internal/services/process/handler/handler.go: `HOME=`+user.HomeDir), so
`/home/user` for E2B's default user."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandqueue.artifacts import ArtifactLimits, LocalStore
from sandqueue.contract import (
    AgentResult,
    AgentTask,
    ParentSession,
    RetryPolicy,
    TaskMessage,
    TaskStatus,
)
from tests.fakes.e2b_sdk import Exit, FakeE2BCloud, FakeEnvd, FakeProcess, Step
from tests.unit.test_e2b_pipeline import E2B_KEY, FakeClaude, Harness, make_settings
from worker.pipeline import TaskContext


def transcript_path(proc: FakeProcess, session: str) -> str:
    home = "/root" if proc.user == "root" else f"/home/{proc.user}"
    project = re.sub(r"[^A-Za-z0-9]", "-", proc.cwd or home)
    return f"{home}/.claude/projects/{project}/{session}.jsonl"


class ResumingClaude(FakeClaude):
    """The fake CLI with sessions: a transcript per session at the documented path, appended
    per turn; `--resume` finds it only in the current cwd's project (as 2.1.221 does)."""

    def __init__(self) -> None:
        super().__init__("ok")
        self.found: list[bytes] = []

    def _ok(self, proc: FakeProcess) -> Iterator[Step]:
        resume = proc.arg("--resume")
        session = resume or str(uuid.uuid4())
        path = transcript_path(proc, session)
        before = proc.sandbox.files.get(path)
        if resume is not None and before is None:
            yield from self._emit(self._init(proc, session), {
                "type": "result", "subtype": "error_during_execution", "is_error": True,
                "session_id": session,
                "errors": [f"No conversation found with session ID: {resume}"]})
            yield Exit(1)
            return
        if before is not None:
            self.found.append(before)
        turn = (before or b"").count(b"\n") // 2 + 1
        prompt = proc.stdin().decode()
        proc.sandbox.files[path] = (before or b"") + (
            json.dumps({"type": "user", "sessionId": session, "text": prompt}) + "\n" +
            json.dumps({"type": "assistant", "sessionId": session, "turn": turn}) + "\n"
        ).encode()
        answer = f"turn {turn}"
        yield from self._emit(self._init(proc, session), self._text(session, answer),
                              self._result(session, answer))
        yield Exit(0)


def harness(cloud: FakeE2BCloud, claude: FakeClaude, store_dir: Path) -> Harness:
    h = Harness(cloud, claude, settings=make_settings())
    limits = ArtifactLimits(max_file_bytes=h.pipeline.settings.artifact_max_file_bytes)
    h.pipeline._artifacts = LocalStore(store_dir, limits)
    return h


def run(h: Harness, task: AgentTask, parent: ParentSession | None = None) -> AgentResult:
    now = time.time()
    ctx = TaskContext(task_id=str(uuid.uuid4()),
                      message=TaskMessage(task=task, submitted_at=now, parent=parent),
                      started_at=now, deadline_at=now + 30, on_event=h.events.append)
    return h.pipeline.run(ctx)


def parent_of(result: AgentResult) -> ParentSession:
    """What the producer puts in the follow-up's message (producer/api.py parent_session)."""
    assert result.transcript is not None and result.session_id is not None
    return ParentSession(task_id=result.task_id, session_id=result.session_id,
                         transcript=result.transcript.name, sha256=result.transcript.sha256,
                         cwd=result.agent_cwd)


def task(prompt: str, **fields: Any) -> AgentTask:
    return AgentTask(prompt=prompt, retry=RetryPolicy(max_attempts=1), **fields)


def test_a_follow_up_resumes_the_session_in_another_sandbox_byte_exact(
        tmp_path: Path) -> None:
    cloud = FakeE2BCloud(api_key=E2B_KEY)
    first_claude, second_claude = ResumingClaude(), ResumingClaude()
    first = run(harness(cloud, first_claude, tmp_path), task("write a haiku"))
    assert first.status is TaskStatus.SUCCEEDED, first.error
    assert first.agent_cwd == "/home/user" and first.transcript is not None
    (box1,) = cloud.created
    saved = box1.files[f"/home/user/.claude/projects/-home-user/{first.session_id}.jsonl"]

    # another pipeline (another worker), the same artifact store, a new sandbox
    second = run(harness(cloud, second_claude, tmp_path), task("now shorter"),
                 parent_of(first))
    assert second.status is TaskStatus.SUCCEEDED, second.error
    box2 = next(b for b in cloud.created if b is not box1)
    assert second_claude.found == [saved]  # restored byte for byte before the CLI ran
    path = f"/home/user/.claude/projects/-home-user/{first.session_id}.jsonl"
    assert box2.file_owners[path] == "user"  # written as the CLI's user, who appends to it
    (agent,) = [p for p in box2.processes_of("claude") if "--resume" in p.argv]
    assert agent.arg("--resume") == first.session_id and agent.cwd == "/home/user"
    assert second.session_id == first.session_id and second.result == "turn 2"
    assert second.transcript is not None and second.transcript.sha256 != first.transcript.sha256


def test_the_transcript_is_restored_and_resumed_under_the_parents_cwd(
        tmp_path: Path) -> None:
    """2.1.221's `--resume` finds a transcript only under the current cwd's project (the fake
    CLI ends "No conversation found" otherwise): the adapter must restore it under the
    parent's cwd AND run the CLI there, whatever the follow-up's own workdir would be."""
    cloud = FakeE2BCloud(api_key=E2B_KEY)
    first = run(harness(cloud, ResumingClaude(), tmp_path), task("write a haiku"))
    moved = parent_of(first).model_copy(update={"cwd": "/home/user/elsewhere"})

    def elsewhere_exists(envd: FakeEnvd) -> None:
        envd.dirs.add("/home/user/elsewhere")

    cloud.on_create.append(elsewhere_exists)
    claude = ResumingClaude()
    second = run(harness(cloud, claude, tmp_path), task("now shorter"), moved)
    assert second.status is TaskStatus.SUCCEEDED, second.error
    (agent,) = [p for p in cloud.created[-1].processes_of("claude") if "--resume" in p.argv]
    assert agent.cwd == "/home/user/elsewhere"
    assert claude.found and claude.found[0].count(b"\n") == 2
