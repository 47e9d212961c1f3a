"""A simulated sandbox's filesystem: a temporary directory standing for the sandbox's `/`.

Files the worker writes, files the scripted agent edits and the repositories `git` clones
live here, so `read_file`, `list_files` and `git diff` behave as they do in a sandbox. `git`
is the one real program the simulated shell runs (argv, no shell, `HOME` inside the disk):
cloning and diffing are what the workspace steps need tested for real. Unlike a sandbox, a
`file://` URL reaches the worker's own filesystem: that is how tests serve a bare repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sandqueue import errors
from worker.sandbox.base import CommandResult, FileEntry


class SimDisk:
    def __init__(self, user: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sandqueue-sim-")).resolve()
        self.home = f"/home/{user}" if user != "root" else "/root"
        self.host(self.home).mkdir(parents=True, exist_ok=True)

    def host(self, path: str) -> Path:
        """Where a sandbox path lives on this machine; relative paths start at home."""
        if not path.startswith("/"):
            path = f"{self.home}/{path}"
        host = (self.root / path.lstrip("/")).resolve()
        if host != self.root and self.root not in host.parents:
            raise errors.InvalidTask(f"[simulated] {path} is outside the sandbox")
        return host

    def sandbox_path(self, host: Path) -> str:
        return "/" + host.relative_to(self.root).as_posix()

    def write(self, path: str, data: bytes) -> None:
        target = self.host(path)
        if ".git" in target.relative_to(self.root).parts:
            # Unlike a sandbox's, this git runs on the worker's host: a repository config
            # written by the task (core.fsmonitor, hooks, filters) would run commands there.
            raise errors.InvalidTask(f"[simulated] writing {path}: the simulated sandbox "
                                     "refuses files inside a .git directory (its git runs on "
                                     "the worker's host); a real sandbox allows them")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def delete(self, path: str) -> None:
        self.host(path).unlink(missing_ok=True)

    def read(self, path: str, max_bytes: int | None = None) -> bytes:
        target = self.host(path)
        if not target.is_file():
            raise errors.SandboxFileNotFound(f"[simulated] reading {path}: no such file")
        with target.open("rb") as f:
            return f.read() if max_bytes is None else f.read(max_bytes)

    def list(self, path: str, depth: int) -> list[FileEntry]:
        base = self.host(path)
        if not base.is_dir():
            raise errors.SandboxFileNotFound(f"[simulated] listing {path}: no such directory")
        out: list[FileEntry] = []
        self._walk(base, depth, out)
        return out

    def _walk(self, directory: Path, depth: int, out: list[FileEntry]) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_symlink():
                continue  # as E2B lists them: not followed
            host = Path(entry.path)
            is_dir = entry.is_dir()
            out.append(FileEntry(self.sandbox_path(host), 4096 if is_dir else
                                 entry.stat().st_size, is_dir))
            if is_dir and depth > 1:
                self._walk(host, depth - 1, out)

    def git(self, argv: list[str], *, timeout_s: float, envs: dict[str, str],
            cwd: str | None) -> CommandResult:
        workdir = self.host(cwd or self.home)
        if not workdir.is_dir():
            return CommandResult(1, "", f"[simulated] cd: {cwd}: No such file or directory\n")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.host(
            self.home)), "LANG": "C.UTF-8", "GIT_CONFIG_NOSYSTEM": "1",
               "GIT_CONFIG_GLOBAL": os.devnull, **envs}  # no ~/.gitconfig the task wrote
        try:
            done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return CommandResult(124, "", f"[simulated] {' '.join(argv[:2])}: timed out\n")
        return CommandResult(done.returncode, done.stdout.decode("utf-8", "replace"),
                             done.stderr.decode("utf-8", "replace"))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
