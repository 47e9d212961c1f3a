"""REDIS_URL through the real CLI: a password in it is never printed (issue 8 item 3), and a
malformed URL is a configuration error with exit 2 from every command, the worker included,
never a traceback (item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sandqueue.localredis import free_port
from tests.integration.conftest import CliResult, RunCli, StartWorker, product_env

pytestmark = pytest.mark.integration

TASK = "00000000-0000-0000-0000-000000000000"


def commands(inputs: Path) -> list[tuple[str, ...]]:
    """Every command that talks to Redis, as a user types them."""
    return [("submit", "Hello"), ("submit", "Hello", "--wait"), ("status", TASK),
            ("result", TASK), ("watch", TASK), ("check",), ("batch", "run", str(inputs)),
            ("batch", "status", "b1"), ("cancel", TASK)]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    path = tmp_path / "inputs.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    return path


def assert_not_shown(password: str, *results: CliResult | str) -> None:
    for result in results:
        text = result if isinstance(result, str) else result.out + result.err
        assert password not in text, text


# -- item 3: credentials in the URL are masked ---------------------------------------------------

def test_a_password_of_an_unreachable_redis_is_never_printed(cli: RunCli, inputs: Path) -> None:
    password = f"PW{uuid.uuid4().hex}"
    url = f"redis://sqit:{password}@127.0.0.1:{free_port()}/0"  # nothing listens there
    for command in commands(inputs):
        result = cli(*command, env={"REDIS_URL": url}, timeout=30)
        assert_not_shown(password, result)
        if command[0] == "batch":
            # The batch commands report Redis errors without naming the URL (the exit code
            # is the CLI helper's: see handle_errors).
            assert result.code != 0, (command, result)
            continue
        assert result.code == 3, (command, result)
        assert "sqit:**@127.0.0.1" in result.out + result.err, (command, result)


@pytest.fixture
def redis_user(rdb: redis.Redis, redis_url: str) -> Iterator[tuple[str, str]]:
    """A Redis user with a password on the session's server: (its URL, the password)."""
    name, password = f"sqit{uuid.uuid4().hex[:6]}", f"PW{uuid.uuid4().hex}"
    rdb.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all")
    yield redis_url.replace("redis://", f"redis://{name}:{password}@"), password
    rdb.execute_command("ACL", "DELUSER", name)


def test_a_wrong_password_is_not_printed_either(cli: RunCli, redis_user: tuple[str, str],
                                                inputs: Path) -> None:
    # Redis answers here (an authentication error), unlike the unreachable case above.
    url, password = redis_user
    wrong = f"WRONG{uuid.uuid4().hex}"
    for command in (("submit", "Hello"), ("status", TASK), ("check",),
                    ("batch", "run", str(inputs))):
        result = cli(*command, env={"REDIS_URL": url.replace(password, wrong)}, timeout=30)
        assert result.code != 0, (command, result)
        assert_not_shown(wrong, result)


def test_a_password_protected_redis_works_and_no_output_or_log_shows_the_password(
    cli: RunCli, redis_user: tuple[str, str], worker_factory: StartWorker, inputs: Path
) -> None:
    url, password = redis_user
    env = {"REDIS_URL": url}
    worker = worker_factory(concurrency=2, env=env)
    submitted = cli("submit", "Hello", "--wait", "--wait-timeout", "30", "--json", env=env)
    assert submitted.code == 0, submitted
    task_id = json.loads(submitted.out)["task_id"]
    shown = [submitted]
    for command in (("status", task_id), ("result", task_id), ("watch", task_id), ("check",),
                    ("batch", "run", str(inputs), "--batch-id", "sqit-pw"),
                    ("batch", "status", "sqit-pw")):
        result = cli(*command, env=env)
        assert result.code == 0, (command, result)
        shown.append(result)
    assert "sqit" in shown[4].out and ":**@" in shown[4].out  # check names the URL, masked
    assert_not_shown(password, *shown, worker.log())
    assert ":**@127.0.0.1" in worker.log()  # the banner names the URL, masked


# -- item 4: malformed URLs -----------------------------------------------------------------------

def assert_config_error(result: CliResult, what: object) -> str:
    text = " ".join((result.out + result.err).split())
    assert result.code == 2, (what, result)
    assert "Traceback" not in text, (what, text)
    assert "REDIS_URL" in text and "redis://127.0.0.1:6379/0" in text, (what, text)
    return text


def test_a_malformed_url_is_a_configuration_error_everywhere(cli: RunCli, inputs: Path) -> None:
    for command in [*commands(inputs), ("worker", "--concurrency", "1"), ("demo",)]:
        assert_config_error(cli(*command, env={"REDIS_URL": "notaurl"}, timeout=30), command)


@pytest.mark.parametrize("url", ["http://x", "redis://127.0.0.1:99999/0"])
def test_other_malformed_urls_from_the_issue(cli: RunCli, url: str) -> None:
    # Settings validates once for every command (the unit tests cover each shape of URL).
    for command in (("submit", "Hello"), ("status", TASK), ("check",), ("worker",)):
        assert_config_error(cli(*command, env={"REDIS_URL": url}, timeout=30), command)


def test_a_malformed_url_with_a_password_is_refused_without_showing_it(cli: RunCli) -> None:
    url = "redis://:SECRETPW@127.0.0.1:0/zero"
    for command in (("submit", "Hello"), ("check", "--json"), ("worker",)):
        text = assert_config_error(cli(*command, env={"REDIS_URL": url}, timeout=30), command)
        assert "SECRETPW" not in text and ":**@127.0.0.1" in text


def test_a_worker_that_cannot_start_exits_non_zero(tmp_path: Path, redis_url: str) -> None:
    # Celery's own start-up failures ("Unrecoverable error") used to end in exit 0: here a
    # result backend Celery cannot load, as a malformed URL once produced.
    script = ("import sys; from celery import Celery; from producer.cli import _run_celery; "
              f"app = Celery('sqit', broker={redis_url!r}, backend='nosuchbackend://x'); "
              "sys.exit(_run_celery(app, ['worker', '--pool=solo', '--loglevel=INFO']))")
    proc = subprocess.run([sys.executable, "-c", script], env=product_env(redis_url),
                          cwd=tmp_path, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    log = proc.stdout.decode() + proc.stderr.decode()
    assert "Unrecoverable error" in log, log
    assert proc.returncode != 0, log
