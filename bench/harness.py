"""The machinery every section shares: a private Redis, real worker processes, and fair timing.

Why it is built this way:

* Workers are real processes (`sandqueue worker` / `celery worker`), started in their own
  process group so that stopping them also stops prefork children, and always stopped
  (`Bench` is a context manager, and SIGTERM is turned into KeyboardInterrupt).
* Tasks are published to a *staging* list first and handed to the idle, warmed-up worker
  with one atomic `RENAME` (which wakes the worker's blocked `BRPOP`). Throughput and
  makespan then measure the worker alone: not worker start-up, and not a producer fighting
  the worker for the machine's two cores while it publishes.
* Completion times come from the result backend (`date_done`, written by the worker when
  the task ends), the same key for sandqueue and bare Celery.
* Redis traffic is read from `INFO` (commandstats, net bytes, CPU) before and after; the
  bench's own commands (INFO, RENAME, the completion polls) go through one connection and
  are counted so they can be subtracted exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psutil
import redis
from celery import Celery

from sandqueue.celeryconf import celery_config
from sandqueue.contract import AgentTask, TaskMessage
from sandqueue.localredis import LocalRedis, start_redis
from sandqueue.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
PY = sys.executable

Kind = Literal["sandqueue", "bare"]
RESULT_PREFIX = "celery-task-meta-"
_SCRUB_PREFIXES = ("SANDQUEUE_",)
_SCRUB = {"REDIS_URL", "E2B_API_KEY", "ANTHROPIC_API_KEY", "E2B_DOMAIN"}


class BenchError(RuntimeError):
    """A section could not produce its figure (a worker died, a wait ran out of time)."""


# -- Redis -----------------------------------------------------------------------------------

def _resp_len(args: Sequence[Any]) -> int:
    """Bytes a command takes on the wire in RESP (what INFO's net counters see)."""
    total = len(f"*{len(args)}\r\n")
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        total += len(f"${len(b)}\r\n") + len(b) + 2
    return total


@dataclass
class Snapshot:
    """What Redis reports at one instant: per-command calls, bytes in/out, its CPU time."""

    calls: Counter[str]
    net_in: int
    net_out: int
    reads: int
    cpu_s: float
    at: float


@dataclass
class Traffic:
    """Redis work between two snapshots, with the bench's own commands taken out."""

    calls: Counter[str]
    net_in: int
    net_out: int
    reads: int
    cpu_s: float

    def per_task(self, n: int) -> dict[str, Any]:
        n = max(1, n)
        return {
            "commands": round(sum(self.calls.values()) / n, 2),
            # Read events Redis processed: one per request a client sent, a pipeline of
            # many commands usually counting once: round trips, near enough.
            "requests": round(self.reads / n, 2),
            "bytes_in": round(self.net_in / n),
            "bytes_out": round(self.net_out / n),
            "redis_cpu_ms": round(1000 * self.cpu_s / n, 3),
            "by_command": {k: round(v / n, 2) for k, v in self.calls.most_common()},
        }


class BenchRedis:
    """A private redis-server on loopback plus one accounting connection to it."""

    def __init__(self) -> None:
        self.local: LocalRedis = start_redis(allow_fake=False)
        self.url = self.local.url
        # One connection, so MONITOR can tell the bench's commands from the workers'.
        self.r = redis.Redis.from_url(self.url, single_connection_client=True,
                                      socket_timeout=60)
        self.r.set_response_callback("INFO", lambda response, **_: response)
        self.own: Counter[str] = Counter()
        self.own_in = 0
        self.own_out = 0
        info = self._info("server")
        self.version = info.get("redis_version", "?")
        self.addr = self.r.client_info().get("addr", "")

    @property
    def pid(self) -> int | None:
        proc = self.local._proc
        return proc.pid if proc is not None else None

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.r.close()
        self.local.stop()

    def cmd(self, *args: Any) -> Any:
        """Run a bench command and count it, so it can be subtracted from the workers'."""
        reply = self.r.execute_command(*args)
        self.own[str(args[0]).lower()] += 1
        self.own_in += _resp_len(args)
        self.own_out += 16 if not isinstance(reply, bytes) else len(reply) + 16
        return reply

    def _info(self, section: str) -> dict[str, str]:
        raw = self.cmd("INFO", section)
        out: dict[str, str] = {}
        for line in raw.decode().splitlines():
            if ":" in line and not line.startswith("#"):
                k, _, v = line.partition(":")
                out[k] = v
        return out

    def reset_stats(self) -> None:
        """Zero Redis's counters (and ours) before a measurement.

        The data stays: a FLUSHALL would also drop kombu's queue bindings, which producers
        that already declared a queue do not declare again.
        """
        self.r.execute_command("CONFIG", "RESETSTAT")
        self.own.clear()
        self.own_in = self.own_out = 0

    def snapshot(self) -> Snapshot:
        info = self._info("all")
        calls: Counter[str] = Counter()
        for k, v in info.items():
            if k.startswith("cmdstat_"):
                fields = dict(p.split("=", 1) for p in v.split(","))
                calls[k.removeprefix("cmdstat_")] = int(fields["calls"])
        calls -= self.own  # the bench's own commands so far
        calls.pop("info", None)
        return Snapshot(
            calls=calls,
            net_in=int(info.get("total_net_input_bytes", 0)) - self.own_in,
            net_out=int(info.get("total_net_output_bytes", 0)) - self.own_out,
            reads=int(info.get("total_reads_processed", 0)) - sum(self.own.values()),
            cpu_s=float(info.get("used_cpu_sys", 0)) + float(info.get("used_cpu_user", 0)),
            at=time.time(),
        )

    @staticmethod
    def diff(a: Snapshot, b: Snapshot) -> Traffic:
        return Traffic(calls=b.calls - a.calls, net_in=b.net_in - a.net_in,
                       net_out=b.net_out - a.net_out, reads=b.reads - a.reads,
                       cpu_s=b.cpu_s - a.cpu_s)

    # -- queue handling -------------------------------------------------------------------
    def release(self, staging: str, queue: str) -> float:
        """Hand every staged message to the workers at once; returns the release time."""
        if not self.cmd("EXISTS", staging):
            raise BenchError(f"nothing staged in {staging!r}")
        self.cmd("RENAME", staging, queue)
        return time.time()

    def count_done(self, ids: Sequence[str]) -> int:
        done = 0
        for chunk in _chunks(ids, 2000):
            done += int(self.cmd("EXISTS", *[RESULT_PREFIX + i for i in chunk]))
        return done

    def wait_done(self, ids: Sequence[str], timeout_s: float, poll_s: float = 0.05) -> float:
        """Block until every id has a result; returns when that was seen. Bounded in time."""
        deadline = time.monotonic() + timeout_s
        last = RESULT_PREFIX + ids[-1]
        while time.monotonic() < deadline:
            # Tasks finish roughly in order: poll one key, then confirm all of them.
            if self.cmd("EXISTS", last) and self.count_done(ids) == len(ids):
                return time.time()
            time.sleep(poll_s)
        done = self.count_done(ids)
        raise BenchError(f"only {done} of {len(ids)} tasks finished within {timeout_s:.0f}s")

    def results(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        plain = redis.Redis.from_url(self.url)
        try:
            for chunk in _chunks(ids, 1000):
                for raw in plain.mget([RESULT_PREFIX + i for i in chunk]):
                    out.append(json.loads(raw) if raw is not None else {})
        finally:
            plain.close()
        return out

    def done_times(self, ids: Sequence[str]) -> list[float]:
        """When each task ended (the worker's `date_done`), as epoch seconds."""
        times = []
        for meta in self.results(ids):
            if meta.get("date_done"):
                times.append(datetime.fromisoformat(meta["date_done"]).timestamp())
        return times

    def started_times(self, ids: Sequence[str]) -> dict[str, float]:
        """When sandqueue began each task (`started_at` in its `sq:task:<id>` record)."""
        plain = redis.Redis.from_url(self.url)
        out: dict[str, float] = {}
        try:
            for chunk in _chunks(ids, 1000):
                pipe = plain.pipeline(transaction=False)
                for i in chunk:
                    pipe.hget(f"sq:task:{i}", "started_at")
                for i, value in zip(chunk, pipe.execute(), strict=True):
                    if value is not None:
                        out[i] = float(value)
        finally:
            plain.close()
        return out


def _chunks(items: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# -- tasks -------------------------------------------------------------------------------------

def agent_task(i: int, *, latency_s: float = 0.0, create_s: float = 0.0,
               tag: str = "bench") -> dict[str, Any]:
    """One benchmark task as an app would submit it (a small prompt, sim timings in envs)."""
    return {
        "prompt": f"Benchmark task {i}: reply with the word done.",
        "envs": {"SIM_LATENCY_S": f"{latency_s:g}", "SIM_CREATE_LATENCY_S": f"{create_s:g}"},
        "labels": {"bench": tag},
    }


def wire_message(task: dict[str, Any]) -> dict[str, Any]:
    """The argument sandqueue's producer puts on the wire for `task` (also sent to bare)."""
    msg = TaskMessage(task=AgentTask.model_validate(task), submitted_at=time.time())
    return msg.model_dump(mode="json", exclude_defaults=True)


def bench_settings(url: str, queue: str) -> Settings:
    return load_settings(redis_url=url, queue=queue, sandbox="sim")


def celery_client(url: str, queue: str) -> Celery:
    """A producer/control Celery app with exactly sandqueue's configuration."""
    app = Celery(f"bench-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(celery_config(bench_settings(url, queue)))
    app.conf.update(broker_connection_retry=False, broker_connection_max_retries=0)
    return app


# -- worker processes --------------------------------------------------------------------------

def worker_env(redis_url: str, queue: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without sandqueue settings or keys, plus the bench's."""
    env = {k: v for k, v in os.environ.items()
           if k not in _SCRUB and not k.startswith(_SCRUB_PREFIXES)}
    env.update({
        "REDIS_URL": redis_url,
        "SANDQUEUE_SANDBOX": "sim",
        "SANDQUEUE_QUEUE": queue,
        "SANDQUEUE_SIM_LATENCY_S": "0",
        "SANDQUEUE_SIM_CREATE_LATENCY_S": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        # Prefork as root only warns with JSON-only content; keep the logs readable.
        "PYTHONWARNINGS": "ignore::UserWarning",
    })
    env.update(extra or {})
    return env


@dataclass
class WorkerSpec:
    kind: Kind
    pool: str
    concurrency: int
    queue: str
    tag: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return f"{self.kind}-{self.tag}@bench"

    def argv(self) -> list[str]:
        if self.kind == "sandqueue":
            return [PY, "-m", "producer.cli", "worker", "--concurrency", str(self.concurrency),
                    "--pool", self.pool, "--loglevel", "WARNING", "--hostname", self.hostname]
        # The same flags `sandqueue worker` passes to Celery.
        return [PY, "-m", "celery", "-A", "bench.bare_app", "worker", f"--pool={self.pool}",
                f"--concurrency={self.concurrency}", f"--queues={self.queue}",
                "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                f"--hostname={self.hostname}"]

    def describe(self) -> str:
        """The worker's command line as a person would type it."""
        args = self.argv()[1:]
        return "python " + " ".join(args)


class RssSampler:
    """Samples the RSS of a process tree (prefork children included) to find its peak."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak = 0
        self.peak_pss = 0  # proportional: pages shared by prefork children counted once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            if n % 5 == 0:  # smaps is slower to read: PSS every 0.5 s
                self.peak_pss = max(self.peak_pss, tree_pss(self.pid))
            n += 1
            self._stop.wait(self.every_s)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_pss(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error, AttributeError):
            total += p.memory_full_info().pss
    return total


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def vm_hwm(pid: int) -> int:
    """Peak resident set of one process (kernel's VmHWM), in bytes; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Worker:
    """One worker process: started, checked ready, warmed, measured and always stopped."""

    def __init__(self, spec: WorkerSpec, redis_url: str, logdir: Path) -> None:
        self.spec = spec
        self.redis_url = redis_url
        logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = logdir / f"worker-{spec.kind}-{spec.tag}.log"
        self._cwd = tempfile.TemporaryDirectory(prefix="sandqueue-bench-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: RssSampler | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("worker not started")
        return self.proc.pid

    def start(self) -> Worker:
        env = worker_env(self.redis_url, self.spec.queue, self.spec.env)
        if self.spec.kind == "sandqueue":
            # Also through the environment: `sandqueue worker --pool prefork` alone runs the
            # threads pool (Celery takes `--pool=prefork` for its default and uses the app's
            # `worker_pool`, which comes from SANDQUEUE_POOL), and `--concurrency N` alone
            # leaves the Redis pools sized for SANDQUEUE_CONCURRENCY. `effective()` checks.
            env["SANDQUEUE_POOL"] = self.spec.pool
            env["SANDQUEUE_CONCURRENCY"] = str(self.spec.concurrency)
        with open(self.log_path, "wb") as log:
            # cwd: an empty directory, so no developer `.env` is read by the worker.
            self.proc = subprocess.Popen(self.spec.argv(), env=env, cwd=self._cwd.name,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _LIVE.add(self)
        self.sampler = RssSampler(self.proc.pid).start()
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"worker {self.spec.hostname} exited ({self.proc.returncode}):\n"
                             f"{tail}")

    def wait_ready(self, control: Celery, timeout_s: float = 60.0) -> float:
        """Ping the worker over Celery's control channel until it answers (it consumes then)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            self.check_alive()
            replies = control.control.ping(destination=[self.spec.hostname], timeout=0.5)
            if replies:
                return time.monotonic() - t0
        raise BenchError(f"worker {self.spec.hostname} did not answer a ping in {timeout_s:.0f}s")

    def effective(self) -> str:
        """Pool and concurrency the worker reports in its banner, e.g. `50 (thread)`."""
        log = self.log_path.read_text(errors="replace")
        match = re.search(r"concurrency: (\d+ \(\w+\))", log)
        return match.group(1) if match else "unknown"

    def check_effective(self) -> None:
        """Fail when the worker does not run the pool and concurrency the bench asked for."""
        pool = "thread" if self.spec.pool == "threads" else self.spec.pool
        want = f"{self.spec.concurrency} ({pool})"
        got = self.effective()
        if got != want:
            raise BenchError(f"worker {self.spec.hostname} runs {got}, not {want}")

    def rss(self) -> int:
        return tree_rss(self.pid)

    def peak_rss(self) -> int:
        """Peak RSS: the kernel's VmHWM for one process, the sampled tree peak for prefork."""
        sampled = self.sampler.peak if self.sampler else 0
        if self.spec.pool == "prefork":
            return sampled
        return max(vm_hwm(self.pid), sampled)

    def peak_pss(self) -> int:
        return self.sampler.peak_pss if self.sampler else 0

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the whole group if it does not go."""
        if self.sampler is not None:
            self.sampler.stop()
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout_s)
            # The group: prefork children, and the leader too if it ignored SIGTERM.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        _LIVE.discard(self)
        self._cwd.cleanup()


_LIVE: set[Worker] = set()


def stop_all_workers() -> None:
    """Last resort (exit path): stop every worker this process started and did not stop."""
    for w in list(_LIVE):
        with contextlib.suppress(Exception):
            w.stop(timeout_s=5)


# -- one run ---------------------------------------------------------------------------------

class Bench(contextlib.AbstractContextManager["Bench"]):
    """A Redis and the workers of one section; everything started here is stopped on exit."""

    def __init__(self, logdir: Path | None = None) -> None:
        self.logdir = logdir or OUT / "logs"
        self.redis = BenchRedis()
        self.workers: list[Worker] = []
        self._clients: list[Any] = []
        self._sq_clients: dict[str, Any] = {}

    def __exit__(self, *exc: object) -> None:
        for w in reversed(self.workers):
            with contextlib.suppress(Exception):
                w.stop()
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self.redis.stop()

    def control(self, queue: str) -> Celery:
        app = celery_client(self.redis.url, queue)
        self._clients.append(app)
        return app

    def sandqueue_client(self, queue: str) -> Any:
        from producer.api import Client

        if queue not in self._sq_clients:
            client = Client(bench_settings(self.redis.url, queue))
            self._clients.append(_ClientCloser(client))
            self._sq_clients[queue] = client
        return self._sq_clients[queue]

    @contextlib.contextmanager
    def worker(self, spec: WorkerSpec, *, warmup: int = 20) -> Iterator[Worker]:
        """A started, ready and warmed worker, stopped when the block ends."""
        w = Worker(spec, self.redis.url, self.logdir).start()
        self.workers.append(w)
        try:
            control = self.control(spec.queue)
            w.wait_ready(control)
            w.check_effective()
            if warmup:
                self.warm(w, control, warmup)
            yield w
        finally:
            w.stop()
            self.workers.remove(w)

    def warm(self, w: Worker, control: Celery, n: int) -> None:
        """Run a few zero-time tasks so imports, pools and the runtime exist before timing."""
        staging = f"{w.spec.queue}.warm"
        ids = self.publish(w.spec.kind, [agent_task(i, tag="warmup") for i in range(n)],
                           staging, w.spec.queue, control)
        self.redis.release(staging, w.spec.queue)
        self.redis.wait_done(ids, timeout_s=120)

    def publish(self, kind: Kind, tasks: Sequence[dict[str, Any]], staging: str, queue: str,
                control: Celery | None = None) -> list[str]:
        """Put tasks on `staging` the way each system's producer does; returns their ids."""
        if kind == "sandqueue":
            client = self.sandqueue_client(queue)
            return [client.submit(t, queue=staging).id for t in tasks]
        from bench.bare_app import NOOP

        app = control or self.control(queue)
        return [app.send_task(NOOP, args=[wire_message(t)], queue=staging).id for t in tasks]


class _ClientCloser:
    """Closes a sandqueue Client's Redis pool and Celery app (the Client has no close())."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def close(self) -> None:
        d = self.client.__dict__
        if "celery" in d:
            d["celery"].close()
        if "redis" in d:
            d["redis"].close()


# -- statistics ------------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = max(0, min(len(data) - 1, round(q / 100 * (len(data) - 1))))
    return data[k]


def window_rate(done: Sequence[float], lo: float = 10, hi: float = 90) -> float:
    """Steady-state tasks/s: completions between the lo-th and hi-th percentile of end times.

    Cuts the ramp-up (first slots filling) and the drain (last tasks finishing with idle
    slots), which are the same for both systems but would blur a per-task cost.
    """
    data = sorted(done)
    if len(data) < 10:
        return float("nan")
    i, j = int(len(data) * lo / 100), int(len(data) * hi / 100) - 1
    span = data[j] - data[i]
    return (j - i) / span if span > 0 else float("nan")


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one instant (tasks in flight at once)."""
    events = []
    for a, b in intervals:
        events += [(a, 1), (b, -1)]
    events.sort(key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def mb(n: float) -> float:
    return round(n / 2**20, 1)
