"""Follow-up turns across worker processes: the second task continues the first one's session.

Two real workers, one after the other (the first is stopped before the follow-up is
submitted, so the follow-up cannot run where the first task ran, and the first sandbox is
long gone). They share only Redis and the artifact store (a local directory, as on one
machine or a shared volume). The simulated CLI keeps transcripts where Claude Code does and,
when resumed, says which session, which turn, and the size and sha256 of the transcript it
found: that is how the test sees the transcript restored byte-exact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from producer.api import Client
from sandqueue import errors
from sandqueue.artifacts import LocalStore
from sandqueue.contract import TaskStatus, session_store_key
from tests.integration.conftest import RunCli, StartWorker

FAST = {"SIM_LATENCY_S": "0.05"}


def test_a_follow_up_continues_the_session_on_another_worker(
        worker_factory: StartWorker, api_client: Client, cli: RunCli) -> None:
    first_worker = worker_factory(concurrency=1)
    first = api_client.submit("Remember the number 42.", envs=FAST).wait(timeout=60)
    assert first.status is TaskStatus.SUCCEEDED, first.error
    assert first.transcript is not None and first.session_id is not None
    assert first.transcript.name == f"session/{first.session_id}.jsonl"
    assert first.attempt_log[0].worker is not None
    assert first.attempt_log[0].worker.startswith(first_worker.name)
    worker_factory.discard(first_worker)

    second_worker = worker_factory(concurrency=1)
    code, out, err = cli("submit", "--continue", first.task_id, "What was the number?",
                         "--env", "SIM_LATENCY_S=0.05", "--wait", "--json")
    assert code == 0, err
    second = json.loads(out)
    assert second["status"] == "succeeded"
    assert second["parent_id"] == first.task_id
    assert second["attempt_log"][0]["worker"].startswith(second_worker.name)
    # the same session, resumed (the sim only says "resumed" when given --resume <id>)
    assert second["session_id"] == first.session_id
    said = re.search(r"resumed session (\S+), turn (\d+), from a transcript of (\d+) bytes "
                     r"\(sha256 ([0-9a-f]{64})\)", second["result"])
    assert said is not None, second["result"]
    assert said.group(1) == first.session_id and said.group(2) == "2"
    # restored byte-exact: what the agent found is what the first task saved
    assert int(said.group(3)) == first.transcript.size
    assert said.group(4) == first.transcript.sha256
    # the follow-up saved the session again, now with both turns
    assert second["transcript"]["name"] == first.transcript.name
    assert second["transcript"]["size"] > first.transcript.size


def test_continuing_a_task_whose_transcript_is_gone_is_refused_at_submit(
        worker_factory: StartWorker, api_client: Client) -> None:
    worker_factory(concurrency=1)
    handle = api_client.submit("Say something.", envs=FAST)
    assert handle.wait(timeout=60).status is TaskStatus.SUCCEEDED
    store = LocalStore(os.environ["SANDQUEUE_ARTIFACT_DIR"])
    assert store.delete(session_store_key(handle.id)) == 1  # expired, or removed by hand

    queued_before = api_client.redis.llen("sandqueue")
    try:
        handle.follow_up("And then?")
    except errors.InvalidTask as e:
        assert "session transcript is gone from the artifact store" in e.message
        assert handle.id in e.message
    else:
        raise AssertionError("the follow-up was accepted")
    assert api_client.redis.llen("sandqueue") == queued_before  # nothing was queued


def test_continuing_an_unknown_or_unfinished_task_says_so(api_client: Client) -> None:
    for parent, said in (("no-such-task", "no task no-such-task is known"),):
        try:
            api_client.submit("next", parent_id=parent)
        except errors.InvalidTask as e:
            assert said in e.message
        else:
            raise AssertionError("accepted")
    queued = api_client.submit("not started: no worker runs")
    try:
        queued.follow_up("next")
    except errors.InvalidTask as e:
        assert "has not finished (queued)" in e.message
    else:
        raise AssertionError("accepted")
    queued.cancel()


def _bare_repo(root: Path) -> str:
    """A bare repository with one commit, served over file:// (workers share this disk)."""
    work = root / "work"
    work.mkdir()
    ident = ["-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "first"]):
        if args[0] == "add":
            (work / "README.md").write_text("hello\n")
        subprocess.run(["git", *ident, *args], cwd=work, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "repo.git")],
                   check=True, capture_output=True)
    return f"file://{root / 'repo.git'}"


def test_with_files_restores_the_parents_repository_changes_and_collected_files(
        worker_factory: StartWorker, api_client: Client, tmp_path: Path) -> None:
    worker_factory(concurrency=2)
    url = _bare_repo(tmp_path)
    first = api_client.submit("Edit the README and write a note.", repo=url,
                              collect=["notes/*.txt"], envs={**FAST, "SIM_EDITS": json.dumps(
                                  {"README.md": "edited by turn one\n",
                                   "notes/a.txt": "a note\n"})}).wait(timeout=60)
    assert first.status is TaskStatus.SUCCEEDED, first.error
    assert {a.name for a in first.artifacts} == {"repo.diff", "files/notes/a.txt"}

    try:  # a repository's session continues only with its files
        api_client.submit("next", parent_id=first.task_id, repo=url)
    except errors.InvalidTask as e:
        assert "continue it with with_files" in e.message
    else:
        raise AssertionError("accepted")

    # no SIM_EDITS now: whatever the follow-up finds, it got from its parent
    second = api_client.get(first.task_id).follow_up(
        "Go on.", with_files=True, repo=url, collect=["notes/*.txt"], envs=FAST).wait(timeout=60)
    assert second.status is TaskStatus.SUCCEEDED, second.error
    assert second.repo_commit == first.repo_commit  # cloned at the parent's commit
    store = LocalStore(os.environ["SANDQUEUE_ARTIFACT_DIR"])
    assert store.get(second.task_id, "files/notes/a.txt") == b"a note\n"
    assert store.get(second.task_id, "repo.diff") == store.get(first.task_id, "repo.diff")
    assert second.session_id == first.session_id
