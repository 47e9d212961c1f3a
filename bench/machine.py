"""Describe the machine a run happened on: numbers mean little without it.

Timings on a shared 2-core VM are noisy, so the description includes the load average at
the start and the end of the run, next to the CPU, memory and software versions.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _redis_server() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or "unknown"


def _virtualisation() -> str:
    """Container and/or VM: a hypervisor's steal time is one more source of noise."""
    parts = []
    try:
        out = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        if out and out != "none":
            parts.append(out)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        if " hypervisor" in Path("/proc/cpuinfo").read_text():
            parts.append("VM (hypervisor flag)")
    except OSError:
        pass
    return ", ".join(parts) or "bare metal"


def _git_revision() -> str:
    """The commit measured, and whether the work tree had changes on top of it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                              capture_output=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, text=True, capture_output=True, timeout=10,
                               check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def describe() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "virtualisation": _virtualisation(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis_server": _redis_server(),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis_py": _version("redis"),
        "pydantic": _version("pydantic"),
        "sandqueue": _version("sandqueue"),
        "git": _git_revision(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
