"""Where the time goes: a sampling profile of a worker, a Redis command trace, a producer profile.

* Worker side: `py-spy record` attached to the running worker process (prefork children
  included), so the worker runs unmodified; the samples are aggregated here into shares per
  function (inclusive and self) and per package. py-spy samples only threads that are not
  idle, so the shares are of the process's busy time. Done in its own round, after the timed
  rounds, because sampling slows the target down.
* Redis: `MONITOR` during a handful of tasks, grouped by command and key shape, shows which
  commands a task costs and which part of the code sends them.
* Producer side: `cProfile` around a `Client.submit` loop in this process.
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

_REPO = Path(__file__).resolve().parent.parent


def pyspy_binary() -> str | None:
    """py-spy next to this interpreter (the venv's bin/), else on the PATH."""
    venv_bin = Path(sys.executable).parent / "py-spy"
    if venv_bin.exists():
        return str(venv_bin)
    return shutil.which("py-spy")


@contextlib.contextmanager
def pyspy(pid: int, out: Path, *, subprocesses: bool = False, rate: int = 200,
          max_s: float = 120) -> Iterator[dict[str, Any]]:
    """Sample `pid` while the block runs; the collapsed stacks land in `out`.

    Yields a dict that gets `error` set when py-spy is missing or cannot attach (it needs
    ptrace rights, which some containers withhold), so callers report rather than fail.
    """
    state: dict[str, Any] = {"path": str(out), "error": None}
    binary = pyspy_binary()
    if binary is None:
        state["error"] = "py-spy is not installed (pip install py-spy)"
        yield state
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [binary, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--gil",
            "--rate", str(rate), "--duration", str(int(max_s)), "--output", str(out)]
    if subprocesses:
        args.append("--subprocesses")
    log = out.with_suffix(".log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # let it attach before the work starts
    try:
        if proc.poll() is not None:
            state["error"] = f"py-spy exited: {log.read_text(errors='replace')[-500:]}"
        yield state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if state["error"] is None and not out.exists():
            state["error"] = f"py-spy wrote nothing: {log.read_text(errors='replace')[-500:]}"


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def _package(file: str) -> str:
    """The package a frame's file belongs to, as py-spy shortens paths (`celery/app/trace.py`)."""
    head = file.split("/", 1)[0]
    if head.endswith(".py") or "/" not in file:
        return "stdlib/other" if head not in {"bare_app.py"} else "bench"
    return head


def analyze_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    """Shares of samples per function (inclusive and self) and per package of the leaf frame."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        names = []
        for f in frames:
            m = _FRAME.match(f)
            names.append(f"{m['func']} ({m['file']})" if m else f)
        for name in set(names):
            inclusive[name] += count
        if names:
            self_time[names[-1]] += count
            m = _FRAME.match(frames[-1])
            packages[_package(m["file"]) if m else "?"] += count

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"name": k, "pct": round(100 * v / total, 1)} for k, v in c.most_common(top)]

    return {
        "samples": total,
        "by_package_self": share(packages),
        "inclusive": share(inclusive),
        "self": share(self_time),
        "tree": call_tree(path),
    }


_OURS = re.compile(r"^(sandqueue|worker)/")
_WRAPPERS = ("<lambda>", "Runtime._safe", "run_agent_task")


def _bucket(stack: str) -> str:
    """Where a stack with no sandqueue frame runs: the consumer loop or a pool thread."""
    if "asynloop" in stack or "Hub.create_loop" in stack:
        return "[main thread: Celery/kombu consumer loop]"
    if "trace_task" in stack or "_worker (concurrent" in stack or "process_task" in stack:
        return "[pool: Celery task tracing, result store, ack]"
    return "[other]"


def call_tree(path: Path, *, min_pct: float = 1.0, max_depth: int = 12) -> list[dict[str, Any]]:
    """sandqueue's own frames as a call tree (samples outside them bucketed by thread role).

    Each row: depth, function, share of busy samples, and the share of those samples that
    were inside redis-py (so a row reads "this much time, mostly Redis round trips").
    Thin wrappers (lambdas, `_safe`) are skipped to keep the tree short.
    """
    node: Counter[tuple[str, ...]] = Counter()
    in_redis: Counter[tuple[str, ...]] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_FRAME.match(f) for f in stack.split(";")]
        ours = [m["func"] for m in frames if m and _OURS.match(m["file"])
                and not m["func"].endswith(_WRAPPERS)]
        path_ = tuple(ours) if ours else (_bucket(stack),)
        leaf = frames[-1]
        redis_leaf = bool(leaf and leaf["file"].startswith("redis/"))
        for d in range(1, min(len(path_), max_depth) + 1):
            node[path_[:d]] += count
            if redis_leaf:
                in_redis[path_[:d]] += count
    rows: list[dict[str, Any]] = []

    def walk(prefix: tuple[str, ...]) -> None:
        kids = sorted(((k, v) for k, v in node.items()
                       if len(k) == len(prefix) + 1 and k[:len(prefix)] == prefix),
                      key=lambda kv: -kv[1])
        for key, v in kids:
            pct = 100 * v / max(total, 1)
            if pct < min_pct:
                continue
            rows.append({"depth": len(prefix), "name": key[-1], "pct": round(pct, 1),
                         "redis_pct": round(100 * in_redis[key] / v)})
            walk(key)

    walk(())
    return rows


# -- Redis command trace ---------------------------------------------------------------------

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{12,}")
_NO_KEY = {"multi", "exec", "ping", "client", "info", "select", "hello", "auth"}


def _shape(command: str) -> str:
    """`HSET sq:task:3f2a… status running` -> `hset sq:task:*`."""
    parts = command.split()
    if not parts:
        return "?"
    name = parts[0].lower()
    if name in _NO_KEY or len(parts) < 2:
        return name
    key = parts[1]
    if name in {"evalsha", "eval"} and len(parts) > 3:
        key = parts[3]
    return f"{name} {_ID.sub('*', key.strip(chr(34)))}"


class MonitorTrace:
    """Collects `MONITOR` output in a thread, leaving out the bench's own connection."""

    def __init__(self, url: str, exclude_addr: str) -> None:
        self.url = url
        self.exclude = exclude_addr
        self.shapes: Counter[str] = Counter()
        self.total = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="monitor")

    def __enter__(self) -> MonitorTrace:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # let the last commands arrive
        self._stop.set()
        # MONITOR blocks until the server sends a line: any command wakes it up.
        poke = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            poke.ping()
        except redis.RedisError:
            pass
        finally:
            poke.close()
        self._thread.join(5)

    def _loop(self) -> None:
        # No socket timeout: redis-py drops a connection whose read timed out, and MONITOR
        # cannot be resumed on a new one without losing commands.
        client = redis.Redis.from_url(self.url)
        try:
            with client.monitor() as m:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        item = m.next_command()
                    except (redis.RedisError, AttributeError):
                        break
                    if self._stop.is_set():  # the poke, or later: not part of the trace
                        break
                    addr = f"{item.get('client_address')}:{item.get('client_port')}"
                    if addr == self.exclude:
                        continue
                    self.shapes[_shape(item.get("command", ""))] += 1
                    self.total += 1
        finally:
            self._ready.set()
            client.close()

    def per_task(self, n: int) -> dict[str, float]:
        return {k: round(v / n, 2) for k, v in self.shapes.most_common()}


# -- producer profile ------------------------------------------------------------------------

def cprofile(fn: Callable[[], object], top: int = 15) -> dict[str, Any]:
    """Profile `fn` in this thread; cumulative shares of the functions that matter."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = []
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((ct, _short(file), func))
    rows.sort(reverse=True)
    seen = set()
    out = []
    for ct, file, func in rows:
        key = f"{func} ({file})"
        if key in seen or func.startswith("<"):
            continue
        seen.add(key)
        out.append({"name": key, "pct": round(100 * ct / wall, 1)})
        if len(out) >= top:
            break
    return {"wall_s": round(wall, 3), "cumulative": out}


def _short(file: str) -> str:
    for marker in ("site-packages/", f"{_REPO}/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return Path(file).name
