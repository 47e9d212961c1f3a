"""The workspace steps on the E2B provider, with the real `e2b` SDK over the fake cloud: what
the worker asks of the sandbox (git commands, their environment, working directory and user;
file reads and listings) and how the SDK's answers come back."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandqueue import errors
from sandqueue.artifacts import ArtifactLimits, LocalStore
from sandqueue.contract import AgentTask, ErrorCategory, RetryPolicy, TaskStatus
from tests.fakes.e2b_sdk import HANG, Err, Exit, FakeE2BCloud, FakeEnvd, FakeProcess, Out, Step
from tests.unit.test_e2b_pipeline import E2B_KEY, MCP, FakeClaude, Harness, make_settings
from worker.agent.claude_code import MCP_CONFIG_PATH

TOKEN = "ghp_e2bWorkspaceToken0123456789"
COMMIT = "c0ffee" * 6 + "beef"
DIFF = (b"diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
        b"@@ -1 +1 @@\n-a\n+b\n")


class FakeGit:
    """`git` in the sandbox: records every call; `fetch` answers as told."""

    def __init__(self, fetch_stderr: str | None = None) -> None:
        self.calls: list[FakeProcess] = []
        self.fetch_stderr = fetch_stderr

    def __call__(self, proc: FakeProcess) -> Iterator[Step]:
        self.calls.append(proc)
        sub = proc.argv[1]
        if sub == "fetch" and self.fetch_stderr is not None:
            yield Err(self.fetch_stderr.encode())
            yield Exit(128)
            return
        if sub == "init":  # `git init -q repo` in the home directory
            proc.sandbox.dirs.add(f"{proc.cwd}/{proc.argv[-1]}")
        if sub == "checkout":
            proc.sandbox.files["/home/user/repo/README.md"] = b"a\n"
            proc.sandbox.files["/home/user/repo/out/report.md"] = b"# report\n"
        if sub == "rev-parse":
            yield Out(f"{COMMIT}\n".encode())
        if sub == "diff":
            output = next(a for a in proc.argv if a.startswith("--output="))
            assert output == "--output=../.sandqueue-repo.diff" and proc.cwd == "/home/user/repo"
            proc.sandbox.files["/home/user/.sandqueue-repo.diff"] = DIFF
        yield Exit(0)


@pytest.fixture
def cloud() -> FakeE2BCloud:
    return FakeE2BCloud(api_key=E2B_KEY)


def harness(cloud: FakeE2BCloud, git: FakeGit, tmp_path: Path, **settings: Any) -> Harness:
    cloud.programs["git"] = git
    h = Harness(cloud, FakeClaude("ok"), settings=make_settings(**settings))
    h.pipeline.environ = {**h.pipeline.environ, "REPO_TOKEN": TOKEN}
    limits = ArtifactLimits(max_file_bytes=h.pipeline.settings.artifact_max_file_bytes)
    h.pipeline._artifacts = LocalStore(tmp_path, limits)
    return h


def task(**fields: Any) -> AgentTask:
    return AgentTask(prompt="fix it", retry=RetryPolicy(max_attempts=1), **fields)


def test_clone_then_collect_over_the_sdk(cloud: FakeE2BCloud, tmp_path: Path) -> None:
    git = FakeGit()
    h = harness(cloud, git, tmp_path)
    result = h.run(task(repo={"url": "https://git.example/acme/api.git", "ref": "main",
                              "token": "${REPO_TOKEN}"},
                        files=[{"path": "brief.md", "content": "do it"}],
                        collect=["out/*.md"]))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.repo_commit == COMMIT
    subs = [p.argv[1] for p in git.calls]
    assert subs == ["init", "remote", "fetch", "checkout", "rev-parse", "add", "diff"]
    assert all(p.user == "user" for p in git.calls)  # the sandbox user, as the agent
    fetch = git.calls[2]
    assert fetch.argv == ["git", "fetch", "-q", "--no-tags", "--depth", "1", "origin", "main"]
    assert fetch.cwd == "/home/user/repo"
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert fetch.envs["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {basic}"
    for proc in git.calls:  # the token is in no command line, and only in the fetch's env
        assert TOKEN not in proc.cmd and basic not in proc.cmd
        if proc is not fetch:
            assert basic not in str(proc.envs)
    (envd,) = cloud.created
    assert envd.files["/home/user/repo/brief.md"] == b"do it"
    # The agent ran in the repository.
    (run,) = [p for p in envd.processes_of("claude") if p.argv[1:] != ["--version"]]
    assert run.cwd == "/home/user/repo"
    store = h.pipeline._artifacts
    assert store is not None
    assert {a.name for a in result.artifacts} == {"repo.diff", "files/out/report.md"}
    assert store.get(result.task_id, "repo.diff") == DIFF
    assert store.get(result.task_id, "files/out/report.md") == b"# report\n"
    assert TOKEN not in result.model_dump_json()
    h.assert_all_killed()


@pytest.mark.parametrize(("stderr", "category", "attempts_more_than_one"), [
    ("remote: Repository not found.\nfatal: Authentication failed", ErrorCategory.AUTH, False),
    ("fatal: unable to access 'https://git.example/': Could not resolve host: git.example",
     ErrorCategory.REPO_UNAVAILABLE, True),
])
def test_fetch_failures_over_the_sdk(cloud: FakeE2BCloud, tmp_path: Path, stderr: str,
                                     category: ErrorCategory,
                                     attempts_more_than_one: bool) -> None:
    h = harness(cloud, FakeGit(fetch_stderr=stderr), tmp_path)
    # a retryable failure is retried until the deadline: long enough for a second attempt
    # on a loaded machine (the permanent one ends at once)
    result = h.run(task(repo="https://git.example/acme/api.git", timeout_s=5), timeout_s=5)
    assert result.error is not None and result.error.category is category
    assert (result.attempts > 1) is attempts_more_than_one
    assert result.agent_runs == 0
    h.assert_all_killed()


def test_an_oversized_file_comes_back_truncated_and_says_so(cloud: FakeE2BCloud,
                                                     tmp_path: Path) -> None:
    h = harness(cloud, FakeGit(), tmp_path, artifact_max_file_bytes=4)
    result = h.run(task(files=[{"path": "big.txt", "content": "0123456789"}],
                        collect=["*.txt"]))
    (ref,) = result.artifacts
    assert ref.truncated and ref.size == 4 and ref.original_size == 10
    assert any("big.txt was truncated" in w for w in result.warnings)


def test_a_fetch_that_outlives_the_clone_timeout_is_repo_unavailable(
        cloud: FakeE2BCloud, tmp_path: Path) -> None:
    """E2B ends a command's stream at its `timeout` with DEADLINE_EXCEEDED, which the SDK
    raises as `TimeoutException` (e2b/envd/rpc.py `_DEFAULT_RPC_ERROR_MAP`), not as an exit
    code: a git server that never answers must still be a retryable repo_unavailable that
    names the clone and its timeout (as the simulated sandbox's exit 124 is), not a
    sandbox_unavailable about the SDK's 'request_timeout'."""
    git = FakeGit()

    def hanging(proc: FakeProcess) -> Iterator[Step]:
        if proc.argv[1] == "fetch":
            git.calls.append(proc)
            yield HANG
            return
        yield from git(proc)

    h = harness(cloud, git, tmp_path, clone_timeout_s=0.5)
    cloud.programs["git"] = hanging
    result = h.run(task(repo="https://git.example/acme/api.git", timeout_s=3), timeout_s=3)
    assert result.error is not None
    assert result.error.category is ErrorCategory.REPO_UNAVAILABLE, result.error
    assert "git fetch" in result.error.message and "SANDQUEUE_CLONE_TIMEOUT_S" in \
        result.error.message
    assert result.agent_runs == 0
    h.assert_all_killed()


def test_a_symlink_to_the_workers_files_is_not_followed_by_collect(
        cloud: FakeE2BCloud, tmp_path: Path) -> None:
    """The agent can make `out/token.json -> ~/.sandqueue/mcp.json` (the gateway's token):
    E2B lists it as a link (e2b/sandbox/filesystem/filesystem.py `map_entry_info`: SYMLINK
    whatever the target's type) and a download would follow it, so only regular files are
    collected. `**` still brings back the agent's real files."""
    link = "/home/user/out/token.json"

    def agent_made_links(envd: FakeEnvd) -> None:
        envd.symlinks[link] = MCP_CONFIG_PATH
        envd.symlinks["/home/user/out/worker"] = "/home/user/.sandqueue"
        envd.files["/home/user/out/real.md"] = b"mine\n"

    cloud.on_create.append(agent_made_links)
    h = harness(cloud, FakeGit(), tmp_path)
    # `out/worker/*`: the link would be the listing's own path, which envd resolves
    result = h.run(task(mcp=MCP, collect=["**", "out/worker/*"]))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    (envd,) = cloud.created
    assert envd.gateway_token and MCP_CONFIG_PATH in envd.files  # the link had a target
    assert [a.name for a in result.artifacts] == ["files/out/real.md"]
    store = h.pipeline._artifacts
    assert store is not None
    for ref in result.artifacts:
        assert envd.gateway_token.encode() not in store.get(result.task_id, ref.name)


def test_a_command_in_a_missing_directory_is_refused_as_envd_does(cloud: FakeE2BCloud) -> None:
    """envd refuses to start a process whose cwd does not exist (INVALID_ARGUMENT "cwd '...'
    does not exist", e2b-dev/infra packages/envd/internal/services/process/handler/
    handler.go), which the SDK raises as InvalidArgumentException: the workspace only ever
    runs git where `git init` made the directory (Sandbox.run: "`cwd` must exist")."""
    from tests.unit.test_e2b_provider import make_provider, make_spec

    cloud.programs["git"] = FakeGit()
    box = make_provider(cloud).create(make_spec())
    try:
        with pytest.raises(errors.InvalidTask, match="does not exist"):
            box.run("git status", timeout_s=10, cwd="/home/user/nowhere")
        assert box.run("git init -q repo", timeout_s=10, cwd="/home/user").exit_code == 0
        assert box.run("git status", timeout_s=10, cwd="/home/user/repo").exit_code == 0
    finally:
        box.kill()


def test_collect_lists_only_the_directories_its_patterns_can_match(
        cloud: FakeE2BCloud, tmp_path: Path) -> None:
    """envd's ListDir walks and answers the whole tree below the path in one response
    (filepath.WalkDir to `depth`, e2b-dev/infra packages/envd/internal/services/filesystem/
    dir.go): `out/*.md` must not make it walk `.git/objects` or a `node_modules` of 100k
    files. Each pattern lists from its literal leading directories, as deep as it reaches."""
    h = harness(cloud, FakeGit(), tmp_path)

    def agent_wrote(envd: FakeEnvd) -> None:
        envd.files.update({"/home/user/repo/out/deep/x.md": b"x",
                           "/home/user/repo/node_modules/m/index.js": b"m",
                           "/home/user/repo/docs/a/b/c.txt": b"c"})

    cloud.on_create.append(agent_wrote)
    result = h.run(task(repo="https://git.example/acme/api.git",
                        collect=["out/*.md", "out/deep/x.md", "docs/**/*.txt", "*.md"]))
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert {a.name for a in result.artifacts} == {
        "repo.diff", "files/out/report.md", "files/out/deep/x.md", "files/docs/a/b/c.txt",
        "files/README.md"}
    (envd,) = cloud.created
    assert sorted(set(envd.list_calls)) == [
        ("/home/user/repo", 1), ("/home/user/repo/docs", 32), ("/home/user/repo/out", 1),
        ("/home/user/repo/out/deep", 1)]
