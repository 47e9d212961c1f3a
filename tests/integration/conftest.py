"""Integration fixtures: a real redis-server, real `sandqueue worker` processes, the real CLI.

Nothing here runs Celery in eager mode or imports the worker into the test process: workers
are subprocesses (`python -m producer.cli worker ...`) in sim mode, the CLI is a subprocess,
and the Python API talks to them through Redis exactly as an application would.

- `redis_url` / `rdb`: one redis-server per session (skipped locally when the binary is
  missing, a failure when the CI variable is set).
- every test starts from an empty Redis (see `_fresh_redis`) and ends with the assertion
  that no simulated sandbox is left alive.
- `worker_factory` (per test) and `module_worker_factory` (per module) start workers and
  wait for their "ready" log line; their logs are attached to the report of a failing test.
- `cli` runs `python -m producer.cli ...` and returns (exit code, stdout, stderr).
- `api_client` is the Python API on the session's Redis; `aof_redis` a second, append-only
  redis-server a test may take down and bring back (`down()`, `up()`, `restart()`), and
  `aof_worker_factory` starts workers on it.
- `wait_until`, `task_record` and `task_events` poll and read a task's state in Redis.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis

from producer.api import Client
from sandqueue import keys
from sandqueue.localredis import LocalRedis, start_redis
from sandqueue.settings import Settings

HERE = Path(__file__).parent
QUEUE = "sandqueue"
WORKER_READY_TIMEOUT_S = 30.0
WORKER_STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 60.0

# Variables a developer's shell may carry that would change what the product does.
_SCRUB_PREFIXES = ("SANDQUEUE_", "E2B_", "ANTHROPIC_", "CELERY_")
_SCRUB_NAMES = {"REDIS_URL", "GH_TOKEN", "GITHUB_TOKEN"}

WORKER_DEFAULTS = {
    "SANDQUEUE_SANDBOX": "sim",
    "SANDQUEUE_BACKOFF_SCALE": "0",
    "SANDQUEUE_SIM_CREATE_LATENCY_S": "0",
    "SANDQUEUE_SIM_LATENCY_S": "0.05",
    "SANDQUEUE_STALL_TIMEOUT_S": "2",
    "PYTHONUNBUFFERED": "1",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


# -- environment ----------------------------------------------------------------------------

def product_env(redis_url: str, overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a worker or CLI subprocess: clean, sim mode, this test's Redis,
    and the artifact store of the test process (a temporary directory, see tests/conftest)."""
    artifact_dir = os.environ.get("SANDQUEUE_ARTIFACT_DIR")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES}
    env.update(WORKER_DEFAULTS)
    if artifact_dir:
        env["SANDQUEUE_ARTIFACT_DIR"] = artifact_dir
    env["REDIS_URL"] = redis_url
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


# -- redis ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    if shutil.which("redis-server") is None:
        why = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"integration tests need a real Redis in CI: {why}")
        pytest.skip(why)
    local = start_redis()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: LocalRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    yield client
    client.close()


def reset_redis(client: redis.Redis) -> None:
    """Empty Redis for the next test.

    A FLUSHALL when no worker is running; with a worker shared by a module, everything but
    kombu's exchange bindings (`_kombu.binding.*`), which the worker declared at start-up and
    which producers need to route by exchange. No test reads or asserts on those sets.
    """
    if not any(w.alive() for w in _LIVE_WORKERS):
        client.flushall()
        return
    doomed = [k for k in client.scan_iter(count=1000) if not k.startswith(b"_kombu.binding.")]
    for i in range(0, len(doomed), 500):
        client.delete(*doomed[i:i + 500])


def _int(value: bytes | None) -> int:
    return int(value) if value is not None else 0


def sim_counts(client: redis.Redis) -> tuple[int, int, int]:
    """(live, created, killed) simulated sandboxes."""
    return (client.scard(keys.SIM_LIVE), _int(client.get(keys.SIM_CREATED)),
            _int(client.get(keys.SIM_KILLED)))


def assert_no_live_sandboxes(client: redis.Redis, settle_s: float = 3.0) -> None:
    """No simulated sandbox is alive and every one created was killed.

    Sandboxes are killed before a result is stored, so this holds as soon as the results
    are in; `settle_s` only absorbs a task that was still finishing when its test ended.
    """
    deadline = time.monotonic() + settle_s
    while True:
        live, created, killed = sim_counts(client)
        if live == 0 and created == killed:
            return
        if time.monotonic() > deadline:
            members = sorted(m.decode() for m in client.smembers(keys.SIM_LIVE))
            raise AssertionError(
                f"simulated sandboxes left behind: {live} live {members}, "
                f"{created} created, {killed} killed"
            )
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _fresh_redis(rdb: redis.Redis) -> Iterator[None]:
    reset_redis(rdb)
    yield
    assert_no_live_sandboxes(rdb)


def dump_redis(client: redis.Redis) -> list[tuple[bytes, bytes]]:
    """Every key with every value it holds, whatever its type, as (key, bytes) pairs."""
    out: list[tuple[bytes, bytes]] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        values: list[bytes] = [key]
        if kind == b"string":
            values.append(client.get(key) or b"")
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                values += [k, v]
        elif kind == b"list":
            values += client.lrange(key, 0, -1)
        elif kind == b"set":
            values += list(client.smembers(key))
        elif kind == b"zset":
            values += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for entry_id, fields in client.xrange(key):
                values.append(entry_id)
                for k, v in fields.items():
                    values += [k, v]
        elif kind != b"none":  # expired between SCAN and TYPE is fine; anything else is new
            raise AssertionError(f"key {key!r} has type {kind!r}, which this dump cannot read")
        out += [(key, v) for v in values]
    return out


def secret_forms(secret: str) -> list[bytes]:
    """The secret's bytes, and the parts of its base64 encodings that do not depend on the
    bytes around it (kombu stores message bodies base64-encoded)."""
    raw = secret.encode()
    forms = [raw]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        start = (shift + 2) // 3 * 4
        end = (shift + len(raw)) // 3 * 4
        if end - start >= 16:
            forms.append(encoded[start:end])
    return forms


def assert_secret_absent(client: redis.Redis, secret: str) -> None:
    forms = secret_forms(secret)
    dumped = dump_redis(client)
    assert dumped, "Redis is empty: the dump is not looking at the right database"
    leaks = sorted({key.decode(errors="replace") for key, value in dumped
                    if any(form in value for form in forms)})
    assert not leaks, f"the secret is stored in Redis under {leaks}"


class RestartableRedis:
    """A redis-server of its own with append-only persistence, which a test takes down and
    brings back up on the same port and data (`down()`, `up()`, `restart()`)."""

    def __init__(self) -> None:
        self.local = start_redis(appendonly=True)
        self.url = self.local.url
        assert self.local._proc is not None
        self._args = self.local._proc.args

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=10)

    def down(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        proc = self.local._proc
        assert proc is not None
        proc.terminate()
        proc.wait(10)

    def up(self, timeout_s: float = 10.0) -> None:
        self.local._proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        wait_until(lambda: _pings(self.url), timeout_s, "redis-server to come back up")

    def restart(self) -> None:
        self.local.restart()

    def stop(self) -> None:
        self.local.stop()


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def aof_redis(redis_server: LocalRedis) -> Iterator[RestartableRedis]:
    """A second redis-server, append-only, for tests that restart Redis under workers (the
    session's server is not restarted: other tests share it)."""
    server = RestartableRedis()
    yield server
    server.stop()


# -- helpers --------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0,
               what: str | Callable[[], str] = "", interval_s: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy and return that value; fail after `timeout_s`
    naming `what` (a callable is called then, to describe the state at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s}s waiting for "
                                 f"{described or predicate}")
        time.sleep(interval_s)
    return value


def task_record(client: redis.Redis, task_id: str) -> dict[str, str]:
    """The task's `sq:task:<id>` hash, decoded."""
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.task(task_id)).items()}


def task_events(client: redis.Redis, task_id: str) -> list[dict[str, Any]]:
    """The task's progress events as published (each with its `ts` as a float)."""
    events = []
    for _, fields in client.xrange(keys.events(task_id)):
        event = json.loads(fields[b"data"])
        event.setdefault("ts", float(fields[b"ts"]))
        events.append(event)
    return events


def make_client(redis_url: str, **settings: Any) -> Client:
    """A producer `Client` for this Redis (settings from the environment, no `.env`)."""
    return Client(Settings(_env_file=None, redis_url=redis_url, **settings))  # type: ignore[call-arg]


def close_client(client: Client) -> None:
    if "celery" in client.__dict__:
        client.celery.close()
    if "redis" in client.__dict__:
        client.redis.close()


@pytest.fixture
def api_client(redis_url: str) -> Iterator[Client]:
    """The Python API, as an application uses it, on the session's Redis."""
    client = make_client(redis_url)
    yield client
    close_client(client)


# -- workers --------------------------------------------------------------------------------

@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    queue: str = QUEUE
    _log_file: Any = field(default=None, repr=False)
    log_mark: int = 0
    """Length of the log when the current test began (set by tests that need it)."""

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
        return self.proc.returncode


_LIVE_WORKERS: list[Worker] = []
"""Workers currently running, whose logs a failing test's report gets."""


class WorkerPool:
    """Starts workers (`pool(concurrency=4, queue=None, env={...})`) and stops them all."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.workers: list[Worker] = []

    def __call__(self, concurrency: int = 4, *, queue: str | None = None,
                 env: dict[str, str | None] | None = None) -> Worker:
        name = f"sqit-{uuid.uuid4().hex[:8]}"
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("wb")
        worker_env = product_env(self.redis_url, env)
        argv = [sys.executable, "-m", "producer.cli", "worker", "--concurrency",
                str(concurrency), "--loglevel", "INFO", "-n", f"{name}@%h"]
        if queue:
            argv += ["-Q", queue]
        # cwd: an empty directory, so no developer `.env` is loaded by the worker.
        proc = subprocess.Popen(argv, env=worker_env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
        worker = Worker(name, proc, log_path, worker_env, queue or QUEUE, log_file)
        self.workers.append(worker)
        _LIVE_WORKERS.append(worker)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while f"{name}@" not in (text := worker.log()) or " ready." not in text:
            if not worker.alive():
                pytest.fail(f"worker {name} exited with {proc.returncode} before it was "
                            f"ready:\n{text}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker {name} not ready after {WORKER_READY_TIMEOUT_S:.0f}s:\n"
                            f"{text}")
            time.sleep(0.05)
        return worker

    def discard(self, worker: Worker) -> None:
        """Stop a worker and stop reporting its log (e.g. one a test has killed)."""
        worker.stop()
        if worker in _LIVE_WORKERS:
            _LIVE_WORKERS.remove(worker)

    def stop_all(self) -> None:
        for worker in self.workers:
            self.discard(worker)


StartWorker = WorkerPool


@pytest.fixture
def worker_factory(redis_url: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[WorkerPool]:
    """Start workers for one test: `worker_factory(concurrency=4, queue=None, env={...})`."""
    pool = WorkerPool(redis_url, tmp_path_factory.mktemp("worker"))
    yield pool
    pool.stop_all()


@pytest.fixture
def aof_worker_factory(aof_redis: RestartableRedis, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[WorkerPool]:
    """Like `worker_factory`, for workers on `aof_redis`."""
    pool = WorkerPool(aof_redis.url, tmp_path_factory.mktemp("aof-worker"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def module_worker_factory(redis_url: str, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[WorkerPool]:
    """Like `worker_factory`, for workers shared by the tests of one module."""
    pool = WorkerPool(redis_url, tmp_path_factory.mktemp("worker"))
    yield pool
    pool.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for worker in _LIVE_WORKERS:
            state = "running" if worker.alive() else f"exited {worker.proc.returncode}"
            report.sections.append((f"worker {worker.name} log ({state})", worker.log()[-30000:]))



def ctrl_c_able() -> None:
    """`preexec_fn` for a command a test will interrupt with SIGINT, as Ctrl-C in a terminal
    would: SIGINT back to its default. A shell without job control starts background jobs
    with SIGINT ignored, and a child inherits that (Python then installs no handler), so a
    suite run in the background (as CI may be) would see every Ctrl-C ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INTERRUPTED = (130, -signal.SIGINT)
"""How a command interrupted by Ctrl-C may end: exit 130 after its message, or, rarely on a
loaded machine, killed by the SIGINT as it exits after printing the same message. A shell
reports both as 130 (128 + SIGINT); a test checks the message and resume hint besides."""

# -- the CLI --------------------------------------------------------------------------------

class CliResult(NamedTuple):
    code: int
    out: str
    err: str


RunCli = Callable[..., CliResult]


def run_cli(redis_url: str, *args: str, stdin: str | bytes | None = None,
            env: dict[str, str | None] | None = None, cwd: Path | str | None = None,
            timeout: float = CLI_TIMEOUT_S) -> CliResult:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True, env=product_env(redis_url, env), cwd=cwd, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout.decode("utf-8", errors="replace"),
                     proc.stderr.decode("utf-8", errors="replace"))


@pytest.fixture
def cli(redis_url: str, tmp_path: Path) -> RunCli:
    """`cli("submit", "hi", "--wait")` -> CliResult(code, out, err), run in an empty dir."""

    def run(*args: str, **kwargs: Any) -> CliResult:
        kwargs.setdefault("cwd", tmp_path)
        return run_cli(redis_url, *args, **kwargs)

    return run


# -- waiting on events instead of sleeping ----------------------------------------------------

UNACKED = "unacked"
"""kombu's hash of delivered, not yet acknowledged messages (its Redis transport default)."""


def recovery_ran_since(client: redis.Redis, since: float, interval_s: float) -> bool:
    """Whether some worker began a recovery cycle after `since` (epoch seconds).

    A cycle starts by taking `sq:lock:recover` for 0.9 x the recovery interval
    (worker/maintenance.py), so the lock's remaining time dates the cycle that holds it. The
    clock is read before the lock's TTL: the estimate is never later than the true start.
    """
    now = time.time()
    pttl = client.pttl(keys.RECOVER_LOCK)
    if pttl <= 0:
        return False
    began = now - (max(0.1, 0.9 * interval_s) - pttl / 1000)
    return began > since


def wait_for_recovery_cycle(client: redis.Redis, since: float, interval_s: float,
                            timeout_s: float = 60.0) -> None:
    """Wait until a recovery cycle began after `since`: e.g. after a message became old enough
    for recovery to consider it, so "recovery did not take it" means something."""
    wait_until(lambda: recovery_ran_since(client, since, interval_s), timeout_s,
               f"a recovery cycle to begin after {since:.3f} (now {time.time():.3f})")


def wait_until_queue_drained(client: Client, rdb: redis.Redis, queue: str = QUEUE,
                             timeout_s: float = 60.0) -> None:
    """Every message published to `queue` so far has been delivered and acknowledged.

    A sentinel task is sent behind them. The queue is first in, first out, so when the
    sentinel has finished every earlier message was delivered; when nothing is left
    unacknowledged (acks are late), each was handled: run, or dropped as a duplicate (the
    worker logs "duplicate delivery ignored"). Tests that assert "no second copy ran" wait on
    this rather than sleeping. The sentinel runs in a sandbox of its own (count it).
    """
    sentinel = client.submit("sentinel: everything before me was delivered", queue=queue)
    assert sentinel.wait(timeout=timeout_s).status.value == "succeeded"
    wait_until(lambda: rdb.llen(queue) == 0 and rdb.hlen(UNACKED) == 0, timeout_s,
               lambda: f"{queue} drained: {rdb.llen(queue)} queued, {rdb.hlen(UNACKED)} "
                       "unacknowledged")
