"""Follow-up turns: an agent's session kept beyond its sandbox.

With `with_files`, the parent's workspace comes back too (`restore_files`): its repo's diff
applied to a fresh clone at the parent's commit (the producer pinned `repo.ref` to it), and
its collected files written where they were.

At the end of every run the agent's session transcript is read out of the sandbox and saved
as an artifact of the task (`save`); a follow-up task, on any worker and after the first
sandbox is gone, writes it back byte for byte at the same place in its new sandbox
(`restore`) and the agent resumes that session. Where the transcript lives is the agent
adapter's knowledge (`Agent.session_transcript`); what is kept and checked is this module's.
"""

from __future__ import annotations

import hashlib
import logging

from sandqueue import errors
from sandqueue.artifacts import ArtifactError, ArtifactNotFound, ArtifactStore
from sandqueue.contract import ArtifactRef, ParentSession, session_store_key
from worker.agent.base import Agent, AgentRun
from worker.sandbox.base import Sandbox
from worker.workspace import COLLECTED_PREFIX, HOME_DIR, REPO_DIR

log = logging.getLogger(__name__)

TRANSCRIPT_PREFIX = "session/"
"""Artifact names of transcripts: `session/<session id>.jsonl`."""
CONTENT_TYPE = "application/x-ndjson"


def transcript_name(session_id: str) -> str:
    return f"{TRANSCRIPT_PREFIX}{session_id}.jsonl"


def save(store: ArtifactStore, agent: Agent, sandbox: Sandbox, task_id: str,
         run: AgentRun, replaces: ArtifactRef | None = None,
         ) -> tuple[ArtifactRef | None, str | None]:
    """(the saved transcript's ref, None) or (None, why it could not be saved: a warning
    for the result). Best effort: a run's outcome never depends on it. `replaces`: an
    earlier attempt's transcript, deleted (the result names the last attempt's session)."""
    key = session_store_key(task_id)
    if replaces is not None and replaces.name != transcript_name(run.session_id or ""):
        try:
            store.delete(key, replaces.name)
        except (ArtifactError, OSError) as e:
            log.warning("task %s: could not delete %s: %s", task_id, replaces.name, e)
    if run.session_id is None:
        return None, None
    try:
        path = agent.session_transcript(run.session_id, run.cwd)
        if path is None:
            return None, None
        limit = store.limits.max_file_bytes
        data = sandbox.read_file(path, max_bytes=limit + 1)
        ref = store.put(key, transcript_name(run.session_id), data[:limit], CONTENT_TYPE,
                        original_size=len(data))  # limit+1 when over: "more than"
    except errors.SandboxFileNotFound:
        return None, "the agent's session transcript was not found in the sandbox; this " \
                     "task cannot be continued"
    except errors.SandqueueError as e:
        log.warning("task %s: saving the session transcript failed: %s", task_id, e.message)
        return None, f"the agent's session transcript could not be saved ({e.message}); " \
                     "this task cannot be continued"
    except Exception as e:  # e.g. a full disk under the local store: the result must stand
        log.exception("task %s: saving the session transcript failed", task_id)
        return None, f"the agent's session transcript could not be saved " \
                     f"({type(e).__name__}: {e}); this task cannot be continued"
    if ref.truncated:
        over_file = len(data) > limit  # else the byte budget of its store key cut it
        size, setting = (f"{len(data)}+", "FILE") if over_file else (str(len(data)), "TASK")
        return ref, (f"the session transcript ({size} bytes) is over "
                     f"SANDQUEUE_ARTIFACT_MAX_{setting}_BYTES and was truncated; this task "
                     "cannot be continued")
    return ref, None


def restore(store: ArtifactStore, agent: Agent, sandbox: Sandbox,
            parent: ParentSession) -> None:
    """Write the parent's transcript where the agent looks for the session, byte-exact."""
    if not agent.resumable:
        raise errors.InvalidTask(f"the {agent.name} agent cannot continue a session; "
                                 "submit the follow-up as a new task")
    path = agent.session_transcript(parent.session_id, parent.cwd)
    if path is None:
        raise errors.InvalidTask(f"the {agent.name} agent keeps no session transcripts")
    try:
        data = store.get(session_store_key(parent.task_id), parent.transcript)
    except ArtifactNotFound as e:
        raise errors.InvalidTask(
            f"task {parent.task_id}'s session transcript is gone from the artifact store "
            "(deleted or expired since the follow-up was submitted); it cannot be "
            "continued") from e
    except ArtifactError as e:
        raise errors.SandboxUnavailable(f"reading task {parent.task_id}'s session "
                                        f"transcript: {e.message}") from e
    if hashlib.sha256(data).hexdigest() != parent.sha256:
        raise errors.InvalidTask(f"task {parent.task_id}'s session transcript changed in the "
                                 "artifact store since it was saved; it cannot be continued")
    sandbox.write_file(path, data)


PARENT_DIFF = f"{HOME_DIR}/.sandqueue/parent.diff"
"""Where the parent's diff is put to be applied: the worker's own folder, never collected.
Named to `git apply` relative to REPO_DIR (the simulated sandbox's git runs on a host path)."""


def restore_files(store: ArtifactStore, sandbox: Sandbox, parent: ParentSession) -> None:
    """The parent's changes to its repository, then its collected files, byte-exact."""
    if parent.diff is not None:
        data = _artifact(store, parent, parent.diff)
        if data.strip():
            sandbox.write_file(PARENT_DIFF, data)
            relative = "../" + PARENT_DIFF.removeprefix(HOME_DIR + "/")
            out = sandbox.run(f"git apply --binary --whitespace=nowarn {relative}",
                              timeout_s=120, cwd=REPO_DIR)
            if out.exit_code != 0:
                raise errors.InvalidTask(
                    f"with_files: task {parent.task_id}'s changes do not apply to its commit "
                    f"{parent.repo_commit} of the repository: {out.stderr.strip()[-300:]}")
    base = parent.cwd or HOME_DIR
    for name in parent.files:
        sandbox.write_file(f"{base}/{name.removeprefix(COLLECTED_PREFIX)}",
                           _artifact(store, parent, name))


def _artifact(store: ArtifactStore, parent: ParentSession, name: str) -> bytes:
    try:
        return store.get(parent.task_id, name)
    except ArtifactNotFound as e:
        raise errors.InvalidTask(f"with_files: task {parent.task_id}'s {name} is gone from "
                                 "the artifact store (deleted or expired)") from e
    except ArtifactError as e:
        raise errors.SandboxUnavailable(f"reading task {parent.task_id}'s {name}: "
                                        f"{e.message}") from e
