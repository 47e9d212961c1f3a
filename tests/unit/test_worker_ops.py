"""What operators run the worker with (issue 8.18, 8.21): Celery's log lines and events
without prompts, results or Reject tracebacks; the health file and its check; the compose
file's healthcheck and optional `.env`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
import yaml
from celery.exceptions import Reject

from sandqueue.settings import Settings
from worker.broker.privacy import ARGS_REPR, TraceLogFilter, summarize
from worker.health import DEFAULT_MAX_AGE_S, check
from worker.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Summarise the private board minutes of ACME"


def _record(msg: str, args: Any, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord("celery.app.trace", logging.WARNING, __file__, 1, msg, None,
                               exc_info)
    record.args = args  # a dict, as Celery passes its context
    return record


def _reject() -> Reject:
    try:
        raise Reject("worker stopping", requeue=True)
    except Reject as e:
        return e


def test_a_reject_is_logged_as_one_line_without_a_traceback() -> None:
    record = _record("Task %(name)s[%(id)s] %(exc)s",
                     {"name": "sandqueue.run_agent_task", "id": "t1",
                      "exc": "reject requeue=True: worker stopping"}, _reject())
    assert TraceLogFilter().filter(record)
    text = logging.Formatter().format(record)
    assert text == "Task sandqueue.run_agent_task[t1] reject requeue=True: worker stopping"


def test_other_exceptions_keep_their_traceback() -> None:
    try:
        raise ValueError("a bug")
    except ValueError as e:
        record = _record("Task %(name)s failed", {"name": "x"}, e)
    TraceLogFilter().filter(record)
    assert "Traceback" in logging.Formatter().format(record)


def test_a_success_line_carries_the_status_not_the_agents_output() -> None:
    result = {"task_id": "t1", "status": "failed", "result": f"echo: {PROMPT}",
              "error": {"category": "auth", "message": "refused", "retryable": False}}
    record = _record("Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
                     {"name": "n", "id": "t1", "runtime": 0.1, "return_value": repr(result),
                      "args": repr([{"task": {"prompt": PROMPT}}]), "kwargs": "{}"})
    TraceLogFilter().filter(record)
    text = logging.Formatter().format(record)
    assert text.endswith("(agent result: failed, auth)")
    assert PROMPT not in text and PROMPT not in repr(record.args)
    assert record.args["args"] == ARGS_REPR  # type: ignore[index]


def test_summarize_without_a_status() -> None:
    assert summarize("None") == "(agent result)"


# -- health ----------------------------------------------------------------------------------

def _runtime(health_file: Path | None,
             server: fakeredis.FakeServer | None = None) -> Runtime:
    settings = Settings(_env_file=None, sandbox="sim",  # type: ignore[arg-type]
                        health_file=str(health_file) if health_file else None)
    rt = Runtime(settings, worker_name="w-health")
    rt.__dict__["redis"] = fakeredis.FakeRedis(server=server or fakeredis.FakeServer())
    return rt


def test_the_lease_renewal_writes_the_heartbeat_and_the_check_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "health"
    assert check(str(path), DEFAULT_MAX_AGE_S)[0] == 1  # not started yet
    _runtime(path).new_maintenance().renew_leases()
    code, why = check(str(path), DEFAULT_MAX_AGE_S)
    assert code == 0 and "w-health" in why
    beat_at = json.loads(path.read_text())["beat_at"]
    code, why = check(str(path), 30, now=beat_at + 31)
    assert code == 1 and "31s ago" in why
    assert check(None, 30)[0] == 2


def test_no_heartbeat_while_redis_does_not_answer(tmp_path: Path) -> None:
    path = tmp_path / "health"
    server = fakeredis.FakeServer()
    rt = _runtime(path, server)
    server.connected = False
    with pytest.raises(redis.ConnectionError):
        rt.new_maintenance().renew_leases()
    assert not path.exists()


def test_the_health_command_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "health"

    def run(env_file: str | None) -> tuple[int, str]:
        env = {"PATH": "/usr/bin:/bin"}
        if env_file:
            env["SANDQUEUE_HEALTH_FILE"] = env_file
        proc = subprocess.run([sys.executable, "-m", "worker.health"], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    assert run(None)[0] == 2
    code, out = run(str(path))
    assert code == 1 and "no heartbeat" in out
    path.write_text(json.dumps({"worker": "w", "pid": 1, "beat_at": time.time()}))
    code, out = run(str(path))
    assert code == 0 and "healthy" in out
    path.write_text(json.dumps({"worker": "w", "pid": 1, "beat_at": time.time() - 600}))
    assert run(str(path))[0] == 1


# -- docker-compose.yml ---------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_without_a_dotenv() -> None:
    """`env_file: .env` is fatal when the file is missing; it must be optional."""
    worker = _compose()["services"]["worker"]
    env_files = worker["env_file"]
    assert isinstance(env_files, list)
    assert all(isinstance(e, dict) and e.get("required") is False for e in env_files), env_files
    for service in _compose()["services"].values():
        assert not isinstance(service.get("env_file"), str), "a required env_file"


def test_compose_worker_has_a_healthcheck_that_this_package_provides() -> None:
    worker = _compose()["services"]["worker"]
    test = worker["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "worker.health"]
    assert worker["environment"]["SANDQUEUE_HEALTH_FILE"]
    assert worker["environment"]["SANDQUEUE_TASK_EVENTS"] == "true"
    # The settings the compose file sets exist (a typo would be silently ignored).
    fields = {f"SANDQUEUE_{name.upper()}" for name in Settings.model_fields}
    for name in worker["environment"]:
        assert name in fields or name == "REDIS_URL", name
