"""What a task brings into its sandbox and what comes back out: the pipeline calls `prepare`
before the agent starts and `collect` when it ends (however it ends), before the kill.

In: `repo` is fetched into REPO_DIR (shallow by default), where the agent then works; a
private repository's token, resolved from the worker's environment, reaches git only as
`http.extraHeader` through `GIT_CONFIG_*` variables of the one fetch command, so it is in no
command line, no `.git/config`, no remote URL, no result. `files` are written into the
working directory.

Out: `collect` globs (relative to the working directory) name the files brought back as
`files/<path>`; with a repo, `git diff --binary` of the working tree against the commit
checked out (untracked files included through intent-to-add) comes back as `repo.diff`.
Every artifact goes to the artifact store (sandqueue/artifacts.py) within its limits; what
could not be brought back is said in the result's warnings, never dropped silently.
"""

from __future__ import annotations

import base64
import logging
import re
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sandqueue import errors
from sandqueue.artifacts import ArtifactError, ArtifactStore, guess_type
from sandqueue.contract import AgentTask, ArtifactRef, RepoSpec
from sandqueue.settings import Settings
from worker.redact import Redactor
from worker.sandbox.base import FileEntry, Sandbox

log = logging.getLogger(__name__)

HOME_DIR = "/home/user"
"""The agent's working directory when the task has no repo (the adapter's WORK_DIR)."""
REPO_DIR = f"{HOME_DIR}/repo"
DIFF_NAME = "repo.diff"
COLLECTED_PREFIX = "files/"
LIST_DEPTH = 32
PRIVATE_PREFIXES = (".sandqueue/", ".sandqueue-repo.diff", ".claude/", ".claude.json")
"""The worker's own files in the home directory (the prompt, the MCP client config with the
gateway's token): never collected, whatever the pattern. Nor the agent's own state there
(merge of h/typed: Claude Code keeps its config, session transcripts and any login under
~/.claude/ and ~/.claude.json; transcripts are saved apart, by worker/sessions.py)."""
_GLOB_CHARS = re.compile(r"[*?\[]")
_DIFF_TMP = "../.sandqueue-repo.diff"
"""Relative to REPO_DIR: outside the repository, so the diff does not diff itself."""

_AUTH = re.compile(r"authentication failed|could not read (username|password)|terminal "
                   r"prompts disabled|\b40[13]\b|permission denied|invalid username|"
                   r"repository not found|access denied|invalid credentials", re.I)
_MISSING = re.compile(r"couldn't find remote ref|not our ref|no such remote ref|"
                      r"repository '[^']*' not found|"
                      r"unadvertised object|does not appear to be a git repository|"
                      r"not a valid object name|invalid refspec", re.I)
_NETWORK = re.compile(r"could not resolve|failed to connect|connection (refused|reset|timed "
                      r"out)|timed out|early eof|rpc failed|hung up|\b5\d\d\b|temporary "
                      r"failure|network is unreachable|unable to access|ssl|tls", re.I)


def workdir(task: AgentTask) -> str:
    """Where the agent works, and where `files` and `collect` paths start."""
    return REPO_DIR if task.repo is not None else HOME_DIR


def classify_clone_failure(stderr: str, doing: str) -> errors.SandqueueError:
    """Refused credentials and missing refs are permanent; the network may come back."""
    tail = stderr.strip()[-600:] or "(git printed nothing)"
    if _AUTH.search(tail):
        return errors.AuthError(f"{doing}: the git server refused access ({tail}); check "
                                "repo.url and that repo.token names a worker variable "
                                "holding a token that can read it")
    if _MISSING.search(tail):
        return errors.InvalidTask(f"{doing}: no such repository or ref ({tail}); check "
                                  "repo.url and repo.ref (a commit must be the full id)")
    if _NETWORK.search(tail):
        return errors.RepoUnavailable(f"{doing}: the git server could not be reached ({tail})")
    return errors.InvalidTask(f"{doing}: git failed ({tail})")


def list_root(pattern: str) -> tuple[str, int]:
    """(the pattern's literal leading directories, how many levels below them it reaches;
    LIST_DEPTH with `**`): `out/*.md` -> ("out", 1), `*.md` -> ("", 1), `docs/**` ->
    ("docs", LIST_DEPTH)."""
    parts = pattern.split("/")
    fixed: list[str] = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    rest = parts[len(fixed):]
    return "/".join(fixed), LIST_DEPTH if "**" in rest else len(rest)


def _real_dir(sandbox: Sandbox, base: str, rel: str, dirs: dict[str, set[str]]) -> bool:
    """Whether `base/rel` is a directory reached through directories only, never through a
    symlink: envd resolves a symlink given as ListDir's own path (dir.go EvalSymlinks), so
    a link the agent made to ~/.sandqueue must not become a listing's root. `dirs` caches
    the one-level listings (the sub-directories of each directory asked)."""
    parent = rel.rpartition("/")[0]
    if parent and not _real_dir(sandbox, base, parent, dirs):
        return False
    if parent not in dirs:
        where = f"{base}/{parent}" if parent else base
        try:  # list_files leaves symlinks out
            dirs[parent] = {e.path for e in sandbox.list_files(where, 1) if e.is_dir}
        except errors.SandboxFileNotFound:
            dirs[parent] = set()
    return f"{base}/{rel}" in dirs[parent]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex over relative paths: `*`, `?`, `[...]` within one path part,
    `**` for any number of parts (`**/*.py` also matches `a.py`)."""
    parts = pattern.split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        text = ""
        j = 0
        while j < len(part):
            c = part[j]
            if c == "*":
                text += "[^/]*"
            elif c == "?":
                text += "[^/]"
            elif c == "[" and "]" in part[j + 1:]:
                end = part.index("]", j + 1)
                body = part[j + 1:end].replace("\\", "\\\\")
                text += f"[{'^' + body[1:] if body.startswith('!') else body}]"
                j = end
            else:
                text += re.escape(c)
            j += 1
        out.append(text if last else text + "/")
    return re.compile("".join(out) + r"\Z", re.S)  # `**` spans names with a newline too


@dataclass
class Collected:
    artifacts: list[ArtifactRef] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Workspace:
    def __init__(self, settings: Settings, store: ArtifactStore,
                 environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.store = store
        self.environ = environ

    # -- in ------------------------------------------------------------------------------
    def prepare(self, sandbox: Sandbox, task: AgentTask, redactor: Redactor,
                deadline_at: float) -> str | None:
        """Clone the repo (returning the commit checked out) and write the input files."""
        commit = None
        if task.repo is not None:
            timeout = max(1.0, min(self.settings.clone_timeout_s, deadline_at - time.time()))
            commit = self._clone(sandbox, task.repo, redactor, timeout)
        base = workdir(task)
        for item in task.files:
            sandbox.write_file(f"{base}/{item.path}", item.data())
        return commit

    def _clone(self, sandbox: Sandbox, repo: RepoSpec, redactor: Redactor,
               timeout: float) -> str:
        doing = f"cloning {repo.url}" + (f" at {repo.ref}" if repo.ref else "")
        self._git(sandbox, "git init -q repo", HOME_DIR, doing)
        self._git(sandbox, f"git remote add origin {shlex.quote(repo.url)}", REPO_DIR, doing)
        depth = f"--depth {repo.depth} " if repo.depth else ""
        fetch = f"git fetch -q --no-tags {depth}origin {shlex.quote(repo.ref or 'HEAD')}"
        try:
            out = sandbox.run(fetch, timeout_s=timeout, cwd=REPO_DIR,
                              envs=self._fetch_envs(repo, redactor))
        except errors.CommandTimedOut as e:  # the simulated sandbox says so with exit 124
            raise errors.RepoUnavailable(
                f"{doing}: git fetch did not finish within {timeout:.0f}s (the git server "
                "did not answer, or the repository is too big for SANDQUEUE_CLONE_TIMEOUT_S "
                "or the task's timeout)") from e
        if out.exit_code != 0:
            raise classify_clone_failure(redactor.text(out.stderr), doing)
        self._git(sandbox, "git checkout -q --detach FETCH_HEAD", REPO_DIR, doing)
        return self._git(sandbox, "git rev-parse HEAD", REPO_DIR, doing).strip()

    def _fetch_envs(self, repo: RepoSpec, redactor: Redactor) -> dict[str, str]:
        """Git reads `GIT_CONFIG_COUNT`/`KEY_n`/`VALUE_n` as `-c` settings (git 2.31+):
        the header lives in this one process's environment and nowhere else."""
        envs = {"GIT_TERMINAL_PROMPT": "0"}
        if repo.token is None:
            return envs
        name = repo.token[2:-1]
        token = self.environ.get(name)
        if not token:
            # As every unresolvable `${NAME}` (worker/credentials.py): mcp_config, permanent.
            raise errors.McpConfigError(f"repo.token refers to ${{{name}}}, which is not set "
                                        f"in this worker's environment; set {name} on every "
                                        "worker")
        basic = base64.b64encode(f"{repo.username}:{token}".encode()).decode()
        redactor.add(token, basic)
        envs.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                     "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"})
        return envs

    @staticmethod
    def _git(sandbox: Sandbox, cmd: str, cwd: str, doing: str) -> str:
        out = sandbox.run(cmd, timeout_s=60, cwd=cwd)
        if out.exit_code != 0:
            raise classify_clone_failure(out.stderr, f"{doing}: {cmd.split(' -')[0]}")
        return out.stdout

    # -- out -----------------------------------------------------------------------------
    def collect(self, sandbox: Sandbox, task: AgentTask, task_id: str,
                repo_commit: str | None) -> Collected:
        """Best effort, within SANDQUEUE_COLLECT_TIMEOUT_S: every failure is a warning."""
        done = Collected()
        until = time.monotonic() + self.settings.collect_timeout_s
        if task.repo is not None and repo_commit is not None:
            self._step(done, "the repo's diff", lambda: self._diff(sandbox, task_id,
                                                                   repo_commit, done))
        if task.collect:
            self._step(done, "collected files", lambda: self._globs(sandbox, task, task_id,
                                                                    until, done))
        return done

    @staticmethod
    def collects(name: str) -> bool:
        """Whether an artifact is one `collect` makes (others, e.g. a transcript, are not
        this module's to replace)."""
        return name == DIFF_NAME or name.startswith(COLLECTED_PREFIX)

    def forget(self, task_id: str, refs: list[ArtifactRef]) -> None:
        """Delete an earlier attempt's artifacts before this one's are stored (best effort:
        a leftover is replaced by name or left over, never an error of the task)."""
        for ref in refs:
            try:
                self.store.delete(task_id, ref.name)
            except (ArtifactError, OSError) as e:  # OSError: the local store's disk
                log.warning("task %s: could not delete %s: %s", task_id, ref.name, e)

    @staticmethod
    def _step(done: Collected, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except (errors.SandqueueError, ArtifactError) as e:
            done.warnings.append(f"artifacts: could not bring back {what}: {e.message}")
        except Exception as e:  # best effort: a bug here must not lose the task's result
            log.exception("collecting %s failed", what)
            done.warnings.append(f"artifacts: could not bring back {what}: "
                                 f"{type(e).__name__}: {e}")

    def _diff(self, sandbox: Sandbox, task_id: str, commit: str, done: Collected) -> None:
        for cmd in ("git add -A -N .", "git diff --binary --no-color --no-ext-diff "
                    f"--output={_DIFF_TMP} {commit}"):
            out = sandbox.run(cmd, timeout_s=self.settings.collect_timeout_s, cwd=REPO_DIR)
            if out.exit_code != 0:
                raise errors.SandqueueError(f"{cmd.split(' -')[0]}: "
                                            f"{out.stderr.strip()[-300:]}")
        path = f"{HOME_DIR}/{_DIFF_TMP.removeprefix('../')}"
        data = sandbox.read_file(path, self.store.limits.max_file_bytes + 1)
        size = None
        if len(data) > self.store.limits.max_file_bytes:  # to be cut: record by how much
            size = next((e.size for e in sandbox.list_files(HOME_DIR, 1) if e.path == path),
                        None)
        self._put(task_id, DIFF_NAME, data, size, done)

    @staticmethod
    def _listed(sandbox: Sandbox, base: str, patterns: list[str]) -> dict[str, FileEntry]:
        """The files the patterns can match, by path relative to `base`: each pattern's
        literal leading directories listed as deep as it reaches (E2B's ListDir walks and
        returns the whole tree below its path: `*.md` must not list a node_modules)."""
        roots: dict[str, int] = {}
        for pattern in patterns:
            root, depth = list_root(pattern)
            roots[root] = max(roots.get(root, 0), depth)
        entries: dict[str, FileEntry] = {}
        dirs: dict[str, set[str]] = {}
        for root, depth in sorted(roots.items()):
            if root and not _real_dir(sandbox, base, root, dirs):
                continue  # its patterns match nothing, and say so
            listed = sandbox.list_files(f"{base}/{root}" if root else base, depth)
            entries.update((e.path[len(base) + 1:], e) for e in listed
                           if not e.is_dir and e.path.startswith(base + "/"))
        return entries

    def _globs(self, sandbox: Sandbox, task: AgentTask, task_id: str, until: float,
               done: Collected) -> None:
        base = workdir(task)
        entries = self._listed(sandbox, base, task.collect)
        chosen: list[str] = []
        for pattern in task.collect:
            regex = glob_regex(pattern)
            hits = [p for p in sorted(entries) if regex.match(p) and not p.startswith(
                        PRIVATE_PREFIXES) and (pattern.startswith(".git/")
                                               or not p.startswith(".git/"))]
            if not hits:
                done.warnings.append(f"artifacts: collect pattern {pattern!r} matched no file")
            chosen.extend(p for p in hits if p not in chosen)
        for i, rel in enumerate(chosen):
            if time.monotonic() > until:
                done.warnings.append(
                    f"artifacts: collecting stopped after SANDQUEUE_COLLECT_TIMEOUT_S; not "
                    f"brought back: {', '.join(chosen[i:][:20])}")
                return
            try:
                data = sandbox.read_file(f"{base}/{rel}", self.store.limits.max_file_bytes + 1)
            except errors.SandboxFileNotFound:
                continue  # deleted between the listing and the read
            self._put(task_id, COLLECTED_PREFIX + rel, data, entries[rel].size, done)

    def _put(self, task_id: str, name: str, data: bytes, listed_size: int | None,
             done: Collected) -> None:
        """Store what was read (at most the file limit + 1 byte, so the store sees that it
        must truncate); the listed size, when known, is the original size it records."""
        over = len(data) > self.store.limits.max_file_bytes
        # Read whole, its length is its size (the task's byte budget may still cut it).
        original = len(data) if not over else (
            max(listed_size, len(data)) if listed_size is not None else None)
        try:
            ref = self.store.put(task_id, name, data, guess_type(name), original_size=original)
        except ArtifactError as e:
            done.warnings.append(f"artifacts: {e.message}")
            return
        if ref.truncated:
            done.warnings.append(f"artifacts: {name} was truncated to {ref.size} bytes "
                                 f"(of {ref.original_size or 'more'}): over the artifact "
                                 "size limits")
        done.artifacts.append(ref)
