"""Repositories in, files and diffs out: the pipeline with the simulated sandbox, whose
`git` is the real one, against bare repositories served over file:// and a loopback HTTP
git host that wants a token."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandqueue.artifacts import LocalStore
from sandqueue.contract import AgentResult, ErrorCategory, TaskStatus
from tests.fakes.git_http import GitHttpServer
from tests.unit.test_pipeline_sim import MODEL_KEY, WATCHDOG, Harness, make_harness
from worker.agent.runner import AgentRunner
from worker.workspace import classify_clone_failure, glob_regex

TOKEN = "ghp_unitTestRepoToken0123456789abcdef"
GIT_ID = ["-c", "user.email=t@example.com", "-c", "user.name=t"]
EDITS = {"README.md": "changed by the agent\n", "src/new.py": "print('new')\n",
         "old.txt": None, "ü space.txt": "unicode name\n"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_ID, *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bare repository with two commits on `main`, a tag `v1` on the first and a branch
    `feature`; binary and text files."""
    root = tmp_path_factory.mktemp("origin")
    work = root / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / "README.md").write_text("hello\n")
    (work / "old.txt").write_text("to be deleted\n")
    (work / "data.bin").write_bytes(bytes(range(256)))
    git(work, "add", ".")
    git(work, "commit", "-qm", "first")
    first = git(work, "rev-parse", "HEAD").strip()
    git(work, "tag", "v1")
    (work / "README.md").write_text("hello again\n")
    git(work, "commit", "-qam", "second")
    second = git(work, "rev-parse", "HEAD").strip()
    git(work, "branch", "feature", first)
    bare = root / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return {"root": root, "url": f"file://{bare}", "first": first, "second": second,
            "bare": bare}


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = make_harness({"REPO_TOKEN": TOKEN}, anthropic_api_key=MODEL_KEY)
    h.pipeline._artifacts = LocalStore(tmp_path / "artifacts")
    yield h


def store(h: Harness) -> LocalStore:
    assert isinstance(h.pipeline._artifacts, LocalStore)
    return h.pipeline._artifacts


def local_diff(origin: dict[str, Any], where: Path, commit: str,
               edits: dict[str, str | None]) -> bytes:
    """The diff computed on this machine: a clone at `commit`, the same edits."""
    subprocess.run(["git", "clone", "-q", str(origin["bare"]), str(where)], check=True)
    git(where, "checkout", "-q", "--detach", commit)
    for path, content in edits.items():
        if content is None:
            (where / path).unlink()
        else:
            (where / path).parent.mkdir(parents=True, exist_ok=True)
            (where / path).write_text(content)
    git(where, "add", "-N", ".")
    return subprocess.run(["git", "diff", "--binary", commit], cwd=where, check=True,
                          capture_output=True).stdout


def run(h: Harness, **fields: Any) -> AgentResult:
    envs = {"SIM_LATENCY_S": "0.05", **fields.pop("envs", {})}
    return h.run("change the repo", envs=envs, **fields)


# -- in: the repository -----------------------------------------------------------------------


def test_the_agents_change_comes_back_as_the_diff_computed_locally(
        harness: Harness, origin: dict[str, Any], tmp_path: Path) -> None:
    result = run(harness, repo={"url": origin["url"]},
                 envs={"SIM_EDITS": json.dumps(EDITS)})
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.repo_commit == origin["second"]
    phases = [e["phase"] for e in harness.events]
    assert phases.index("workspace_ready") < phases.index("agent_started")
    assert {"phase": "workspace_ready", "repo_commit": origin["second"]} in harness.events
    assert {"phase": "artifacts", "count": 1} in harness.events
    (ref,) = [a for a in result.artifacts if a.name == "repo.diff"]
    diff = store(harness).get(result.task_id, "repo.diff")
    assert diff == local_diff(origin, tmp_path / "local", origin["second"], EDITS)
    assert ref.sha256 == hashlib.sha256(diff).hexdigest() and ref.size == len(diff)
    assert ref.content_type == "text/x-diff"
    assert b"new file mode" in diff and b"deleted file mode" in diff
    # The diff applies to a fresh checkout and gives the agent's tree.
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(origin["bare"]), str(fresh)], check=True)
    subprocess.run(["git", "apply", "--binary", "-"], input=diff, cwd=fresh, check=True)
    assert (fresh / "README.md").read_text() == EDITS["README.md"]
    assert (fresh / "src/new.py").exists() and not (fresh / "old.txt").exists()


@pytest.mark.parametrize(("ref", "expected"), [("v1", "first"), ("feature", "first"),
                                               ("main", "second"), (None, "second"),
                                               ("<first>", "first")])
def test_branch_tag_or_commit_is_checked_out(harness: Harness, origin: dict[str, Any],
                                             ref: str | None, expected: str) -> None:
    if ref == "<first>":
        ref = origin["first"]
    result = run(harness, repo={"url": origin["url"], "ref": ref}, collect=["README.md"])
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.repo_commit == origin[expected]
    readme = store(harness).get(result.task_id, "files/README.md")
    assert readme == (b"hello\n" if expected == "first" else b"hello again\n")


def test_a_missing_ref_is_permanent_and_says_which(harness: Harness,
                                                   origin: dict[str, Any]) -> None:
    result = run(harness, repo={"url": origin["url"], "ref": "no-such-branch"})
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category is ErrorCategory.INVALID_TASK
    assert "no-such-branch" in result.error.message and result.attempts == 1


def test_input_files_are_written_into_the_repo_before_the_agent(
        harness: Harness, origin: dict[str, Any]) -> None:
    files = [{"path": "notes/brief.md", "content": "# brief\n"},
             {"path": "blob.bin", "content": "AAEC/w==", "encoding": "base64"}]
    result = run(harness, repo={"url": origin["url"]}, files=files, collect=["**/*.bin",
                                                                              "notes/*"])
    assert result.status is TaskStatus.SUCCEEDED, result.error
    names = {a.name: a for a in result.artifacts}
    assert store(harness).get(result.task_id, "files/blob.bin") == b"\x00\x01\x02\xff"
    assert store(harness).get(result.task_id, "files/notes/brief.md") == b"# brief\n"
    assert set(names) == {"repo.diff", "files/blob.bin", "files/data.bin",
                          "files/notes/brief.md"}
    assert b"notes/brief.md" in store(harness).get(result.task_id, "repo.diff")


# -- in: a private repository over HTTP -------------------------------------------------------


def test_a_private_repo_clones_with_the_token_which_is_nowhere_after(
        harness: Harness, origin: dict[str, Any]) -> None:
    with GitHttpServer(origin["root"], "x-access-token", TOKEN) as host:
        result = run(harness, repo={"url": f"{host.url}/repo.git", "token": "${REPO_TOKEN}"},
                     collect=[".git/config", "README.md"],
                     envs={"SIM_EDITS": json.dumps({"README.md": "x\n"})})
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert host.expected in host.auth_seen  # the header reached the host
    config = store(harness).get(result.task_id, "files/.git/config")
    assert f"{host.url}/repo.git".encode() in config
    everything = [result.model_dump_json().encode(), config,
                  *(store(harness).get(result.task_id, a.name) for a in result.artifacts)]
    for blob in everything:
        assert TOKEN.encode() not in blob
        assert host.expected.split()[1].encode() not in blob


def test_a_refused_token_is_a_permanent_auth_error(harness: Harness,
                                                    origin: dict[str, Any]) -> None:
    h = make_harness({"REPO_TOKEN": "wrong-token-value-123"}, anthropic_api_key=MODEL_KEY)
    with GitHttpServer(origin["root"], "x-access-token", TOKEN) as host:
        result = run(h, repo={"url": f"{host.url}/repo.git", "token": "${REPO_TOKEN}"})
    assert result.status is TaskStatus.FAILED
    assert result.error is not None and result.error.category is ErrorCategory.AUTH
    assert not result.error.retryable and result.attempts == 1
    assert "wrong-token-value-123" not in result.model_dump_json()


def test_an_unreachable_host_is_retried_as_repo_unavailable(harness: Harness,
                                                           origin: dict[str, Any]) -> None:
    with GitHttpServer(origin["root"], "x-access-token", TOKEN) as host:
        host.fail_with = 503
        result = run(harness, repo={"url": f"{host.url}/repo.git"}, timeout_s=1.5)
    assert result.error is not None
    assert result.error.category is ErrorCategory.REPO_UNAVAILABLE, result.error.message
    assert result.error.retryable and result.attempts > 1 and result.agent_runs == 0


def test_a_token_variable_missing_on_the_worker_is_named(harness: Harness,
                                                          origin: dict[str, Any]) -> None:
    result = run(harness, repo={"url": origin["url"], "token": "${NOT_ON_WORKER}"})
    assert result.error is not None and result.error.category is ErrorCategory.MCP_CONFIG
    assert "NOT_ON_WORKER" in result.error.message


@pytest.mark.parametrize(("stderr", "category"), [
    ("fatal: Authentication failed for 'https://github.com/o/r.git/'", ErrorCategory.AUTH),
    ("remote: Repository not found.\nfatal: repository 'https://x/' not found",
     ErrorCategory.AUTH),
    ("fatal: could not read Username for 'https://github.com': terminal prompts disabled",
     ErrorCategory.AUTH),
    ("fatal: unable to access 'https://x/': Could not resolve host: x",
     ErrorCategory.REPO_UNAVAILABLE),
    ("fatal: unable to access 'https://x/': The requested URL returned error: 502",
     ErrorCategory.REPO_UNAVAILABLE),
    ("error: RPC failed; curl 56 Recv failure: Connection reset by peer",
     ErrorCategory.REPO_UNAVAILABLE),
    ("fatal: couldn't find remote ref nope", ErrorCategory.INVALID_TASK),
])
def test_clone_failures_are_classified(stderr: str, category: ErrorCategory) -> None:
    assert classify_clone_failure(stderr, "cloning").category is category


def test_a_missing_repository_over_plain_http_says_so_and_how_to_fix_it() -> None:
    """git's smart-HTTP answer to a repository the server does not have (git http-backend,
    Gitea, ...) is a missing repository, not an unexplained "git failed"."""
    err = classify_clone_failure("fatal: repository 'http://127.0.0.1:9/nope.git/' not found",
                                 "cloning http://127.0.0.1:9/nope.git")
    assert err.category is ErrorCategory.INVALID_TASK
    assert "no such repository" in err.message and "check repo.url" in err.message


@pytest.mark.parametrize("how", ["files", "agent", "global"])
def test_a_task_cannot_make_the_simulated_sandboxs_git_run_commands_on_the_worker(
        harness: Harness, tmp_path: Path, how: str) -> None:
    """The sim's git is a real program on the worker's host: a git config written by the
    task (its `files`, the agent's edits, or a ~/.gitconfig reached through a symlink the
    repository carries) must not make the worker's own clone/diff run a command there."""
    work, marker = tmp_path / "work", tmp_path / "PWNED"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / "up").symlink_to("..")  # a symlink inside the sandbox, to the home directory
    git(work, "add", ".")
    git(work, "commit", "-qm", "first")
    bare = tmp_path / "evil.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    config = f'[core]\n\tfsmonitor = "touch {marker}; false"\n'
    fields: dict[str, Any] = {
        "files": [{"path": ".git/config", "content": config}]} if how == "files" else {
        "envs": {"SIM_EDITS": json.dumps({".git/config" if how == "agent"
                                          else "up/.gitconfig": config, "a.txt": "x"})}}
    result = run(harness, repo={"url": f"file://{bare}"}, **fields)
    assert not marker.exists()
    if how != "global":  # refused, and the task says why
        assert result.error is not None and ".git" in result.error.message


# -- out: collect -------------------------------------------------------------------------------


def test_collect_globs_bring_back_the_right_files_with_their_sha256(harness: Harness) -> None:
    edits = {"out/a.txt": "A", "out/sub/b.txt": "BB", "out/c.log": "C", "top.txt": "T"}
    result = run(harness, collect=["out/**/*.txt", "*.txt", "nothing/*"],
                 envs={"SIM_EDITS": json.dumps(edits)})
    assert result.status is TaskStatus.SUCCEEDED, result.error
    got = {a.name: a for a in result.artifacts}
    assert set(got) == {"files/out/a.txt", "files/out/sub/b.txt", "files/top.txt"}
    for name, ref in got.items():
        data = edits[name.removeprefix("files/")].encode()
        assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
        assert store(harness).get(result.task_id, name) == data
    assert any("'nothing/*' matched no file" in w for w in result.warnings)


def test_an_oversized_artifact_is_truncated_and_says_so(tmp_path: Path) -> None:
    h = make_harness({}, anthropic_api_key=MODEL_KEY, artifact_max_file_bytes=100)
    h.pipeline._artifacts = None
    h.settings.artifact_dir = str(tmp_path)
    big = "x" * 250
    result = run(h, collect=["big.txt"], envs={"SIM_EDITS": json.dumps({"big.txt": big})})
    (ref,) = result.artifacts
    assert ref.truncated and ref.size == 100 and ref.original_size == 250
    assert ref.sha256 == hashlib.sha256(big[:100].encode()).hexdigest()
    assert any("big.txt was truncated to 100 bytes (of 250)" in w for w in result.warnings)


def test_an_oversized_repo_diff_records_its_original_size(tmp_path: Path,
                                                         origin: dict[str, Any]) -> None:
    """As a collected file's: the diff's size is known in the sandbox, so `original_size`
    says how much was cut, not "of more"."""
    h = make_harness({}, anthropic_api_key=MODEL_KEY, artifact_max_file_bytes=100)
    h.pipeline._artifacts = None
    h.settings.artifact_dir = str(tmp_path / "store")
    edits = {"big.txt": "x" * 250}
    result = run(h, repo={"url": origin["url"]}, envs={"SIM_EDITS": json.dumps(edits)})
    (ref,) = result.artifacts
    full = local_diff(origin, tmp_path / "local", origin["second"], edits)
    assert ref.name == "repo.diff" and ref.truncated and ref.size == 100
    assert ref.original_size == len(full)
    assert any(f"repo.diff was truncated to 100 bytes (of {len(full)})" in w
               for w in result.warnings)


def test_a_file_cut_by_the_task_byte_limit_records_its_original_size(tmp_path: Path) -> None:
    h = make_harness({}, anthropic_api_key=MODEL_KEY, artifact_max_task_bytes=100)
    h.pipeline._artifacts = None
    h.settings.artifact_dir = str(tmp_path)
    result = run(h, collect=["*.txt"], envs={"SIM_EDITS": json.dumps(
        {"a.txt": "a" * 60, "b.txt": "b" * 60})})
    a, b = result.artifacts
    assert not a.truncated and (b.truncated, b.size, b.original_size) == (True, 40, 60)
    assert any("b.txt was truncated to 40 bytes (of 60)" in w for w in result.warnings)


def test_artifacts_are_collected_on_timeout(harness: Harness, origin: dict[str, Any]) -> None:
    harness.pipeline.runner = AgentRunner(WATCHDOG, stall_timeout_s=60)  # the deadline first
    result = run(harness, repo={"url": origin["url"]}, collect=["partial.txt"], timeout_s=3,
                 envs={"SIM_LATENCY_S": "60", "SIM_EDITS": json.dumps({"partial.txt": "p"})})
    assert result.status is TaskStatus.TIMED_OUT
    names = {a.name for a in result.artifacts}
    assert names == {"repo.diff", "files/partial.txt"}
    assert b"+p" in store(harness).get(result.task_id, "repo.diff")


def test_artifacts_are_collected_after_a_failure(harness: Harness) -> None:
    result = run(harness, collect=["log.txt"], envs={
        "SIM_FAIL": "agent:is_error", "SIM_EDITS": json.dumps({"log.txt": "what happened"})})
    assert result.status is TaskStatus.FAILED
    assert [a.name for a in result.artifacts] == ["files/log.txt"]


@pytest.mark.parametrize(("pattern", "yes", "no"), [
    ("*.py", ["a.py"], ["d/a.py", "a.pyc"]),
    ("**/*.py", ["a.py", "d/a.py", "d/e/a.py"], ["a.txt"]),
    ("d/**", ["d/a", "d/e/f"], ["a", "dd/a"]),
    ("f?.[ch]", ["f1.c", "fx.h"], ["f12.c", "f1.o"]),
    ("[!a]*.md", ["b.md"], ["a.md"]),
])
def test_glob_semantics(pattern: str, yes: list[str], no: list[str]) -> None:
    regex = glob_regex(pattern)
    assert all(regex.match(p) for p in yes)
    assert not any(regex.match(p) for p in no)


def test_a_file_name_with_a_newline_is_not_dropped_silently(harness: Harness) -> None:
    """`**` matches every name, a newline in it too: the store refuses such a name, and the
    result's warnings say so instead of the file vanishing unmentioned."""
    result = run(harness, collect=["**"], envs={
        "SIM_EDITS": json.dumps({"ok.txt": "z", "out/nl\nname.txt": "y"})})
    assert [a.name for a in result.artifacts] == ["files/ok.txt"]
    assert any("nl\\nname.txt" in w for w in result.warnings), result.warnings


def test_the_workers_own_files_are_never_collected(harness: Harness) -> None:
    result = run(harness, collect=["**", ".sandqueue/*"],
                 envs={"SIM_EDITS": json.dumps({"mine.txt": "m"})})
    assert [a.name for a in result.artifacts] == ["files/mine.txt"]
    assert any("'.sandqueue/*' matched no file" in w for w in result.warnings)


def test_artifacts_are_collected_after_a_cancel(harness: Harness) -> None:
    """Cancelled mid-run, once the agent has written its file: the file comes back."""
    import threading
    import time

    from sandqueue.contract import AgentTask, TaskMessage
    from worker.pipeline import TaskContext

    task = AgentTask(prompt="long job", collect=["partial.txt"], envs={
        "SIM_LATENCY_S": "60", "SIM_EDITS": json.dumps({"partial.txt": "half"})})
    now = time.time()
    ctx = TaskContext(task_id="cancelled-task", message=TaskMessage(task=task),
                      started_at=now, deadline_at=now + 120)

    def cancel_when_written() -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end and not ctx.cancel.is_set():
            for box in list(harness.provider._live.values()):
                if box._disk is not None and box._disk.host("partial.txt").exists():
                    ctx.cancel.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=cancel_when_written)
    watcher.start()
    result = harness.pipeline.run(ctx)
    watcher.join()
    assert result.status is TaskStatus.CANCELLED
    assert [a.name for a in result.artifacts] == ["files/partial.txt"]
    assert store(harness).get("cancelled-task", "files/partial.txt") == b"half"


def test_a_cancel_while_preparing_still_collects_what_is_there(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled just after the inputs were written, before the agent: they come back."""
    import threading

    from worker.workspace import Workspace

    cancel = threading.Event()
    prepare = Workspace.prepare

    def prepare_then_cancel(self: Workspace, *args: Any) -> str | None:
        commit = prepare(self, *args)
        cancel.set()
        return commit

    def run_with_this_cancel(ctx: Any, run_pipeline: Any = harness.pipeline.run) -> Any:
        ctx.cancel = cancel
        return run_pipeline(ctx)

    monkeypatch.setattr(Workspace, "prepare", prepare_then_cancel)
    monkeypatch.setattr(harness.pipeline, "run", run_with_this_cancel)
    result = run(harness, files=[{"path": "in.txt", "content": "input"}], collect=["*.txt"])
    assert cancel.is_set() and result.status is TaskStatus.CANCELLED
    assert result.agent_runs == 0
    assert [a.name for a in result.artifacts] == ["files/in.txt"]


def test_a_retried_task_lists_the_last_attempts_artifacts_once(harness: Harness) -> None:
    result = run(harness, collect=["*.txt"], envs={
        "SIM_FAIL": "agent:overloaded:1", "SIM_EDITS": json.dumps({"a.txt": "a"})})
    assert result.status is TaskStatus.SUCCEEDED and result.agent_runs == 2
    assert [a.name for a in result.artifacts] == ["files/a.txt"]
    assert store(harness).list(result.task_id) == result.artifacts
