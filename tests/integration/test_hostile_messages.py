"""Messages that bypass the producer's validation, straight onto the worker's queue.

A worker trusts nothing that comes out of the broker: a malformed `sandqueue.run_agent_task`
message must end as a stored `failed`/`invalid_task` result without a sandbox being made,
and no message, however broken, may take the worker down or stop it from running the next
valid task.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from producer.api import Client
from sandqueue import keys
from sandqueue.celeryconf import celery_config
from sandqueue.contract import TASK_NAME, AgentResult, ErrorCategory, TaskStatus
from sandqueue.settings import Settings
from tests.integration.conftest import QUEUE, StartWorker, Worker, reset_redis

pytestmark = pytest.mark.integration

RESULT_TIMEOUT_S = 20


def envelope(**task: Any) -> dict[str, Any]:
    """A task message as the producer would send it (TaskMessage, JSON form)."""
    return {"v": 1, "task": {"prompt": "hi", **task}}


@pytest.fixture(scope="module")
def _shared(module_worker_factory: StartWorker) -> dict[str, Any]:
    return {"pool": module_worker_factory, "worker": None}


@pytest.fixture
def worker(_shared: dict[str, Any], rdb: redis.Redis) -> Worker:
    """The module's worker; replaced when an earlier test crashed it, so that one crash
    fails one test instead of every test after it."""
    current: Worker | None = _shared["worker"]
    if current is not None and (not current.alive() or "Unrecoverable error" in current.log()):
        _shared["pool"].discard(current)  # waits for it to exit
        reset_redis(rdb)  # a dying worker puts its unacknowledged (poison) message back
        current = None
    if current is None:
        current = _shared["worker"] = _shared["pool"](concurrency=4)
    current.log_mark = len(current.log())
    return current


@pytest.fixture(scope="module")
def raw_app(redis_url: str) -> Iterator[Celery]:
    """A plain Celery app with sandqueue's configuration: sends whatever it is given."""
    app = Celery("sqit-hostile", set_as_current=False)
    app.conf.update(celery_config(Settings(_env_file=None, redis_url=redis_url)))  # type: ignore[call-arg]
    app.conf.update(broker_connection_retry=False, broker_connection_max_retries=0)
    yield app
    app.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def assert_worker_up(worker: Worker) -> None:
    new_log = worker.log()[worker.log_mark:]
    assert "Unrecoverable error" not in new_log, f"the worker crashed:\n{new_log[-3000:]}"
    assert worker.alive(), f"the worker died (exit code {worker.proc.returncode})"


def wait_result(sent: AsyncResult, worker: Worker) -> Any:
    """The task's stored result, failing fast (not after a timeout) if the worker dies."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while not sent.ready():
        assert_worker_up(worker)
        assert time.monotonic() < deadline, f"no result for {sent.id} in {RESULT_TIMEOUT_S}s"
        time.sleep(0.02)
    return sent.get(timeout=5, propagate=False)


def assert_still_serving(app: Celery, worker: Worker, rdb: redis.Redis) -> None:
    """The worker is alive, runs a valid task, and left nothing stuck in the broker.

    No pause first: the valid task is sent after the hostile one, so by the time it has a
    result the worker has handled the hostile one (and would have logged going down)."""
    assert_worker_up(worker)
    prompt = f"still alive {uuid.uuid4().hex}"
    value = wait_result(app.send_task(TASK_NAME, args=[envelope(prompt=prompt)]), worker)
    result = AgentResult.model_validate(value)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.result is not None and result.result.endswith(f"--- prompt ---\n{prompt}")
    assert_worker_up(worker)
    # Nothing waits in the queue and nothing is held unacknowledged for a re-delivery.
    wait_until(lambda: rdb.llen(QUEUE) == 0 and rdb.hlen("unacked") == 0,
               what="the queue and kombu's unacked hash to be empty")


# -- malformed task messages -----------------------------------------------------------------

HOSTILE: dict[str, tuple[list[Any], dict[str, Any] | None, str]] = {
    # name: (args, kwargs, what the error message must mention)
    "empty dict": ([{}], None, "task"),
    "prompt only, no envelope": ([{"prompt": "hi"}], None, "task"),
    "empty prompt": ([envelope(prompt="")], None, "prompt"),
    "blank prompt": ([envelope(prompt=" \n\t")], None, "prompt"),
    "unknown MCP server": ([envelope(mcp={"githubb": {}})], None, "githubb"),
    "MCP config not an object": ([envelope(mcp={"githubOfficial": "token"})], None, "mcp"),
    "prompt not a string": ([envelope(prompt=12345)], None, "prompt"),
    "wrong types everywhere": (
        [envelope(timeout_s="soon", envs=["A=1"], labels="x", max_turns="many",
                  retry={"max_attempts": "lots"})], None, "timeout_s"),
    "message not an object": (["run this"], None, "message"),
    "message is null": ([None], None, "message"),
    "task is a list": ([{"v": 1, "task": ["prompt", "hi"]}], None, "task"),
    "NaN timeout": ([envelope(timeout_s=float("nan"))], None, "timeout_s"),
    "huge max_turns": ([envelope(max_turns=10**40)], None, "max_turns"),
    "huge prompt": ([envelope(prompt="x" * (300 * 1024))], None, "prompt"),
    "huge label": ([envelope(labels={"k": "v" * (1024 * 1024)})], None, "labels"),
    "too many envs": ([envelope(envs={f"E{i}": "1" for i in range(500)})], None, "envs"),
    "unknown task field": ([envelope(shell="rm -rf /")], None, "shell"),
    "unknown message field": ([{**envelope(), "admin": True}], None, "admin"),
    "future contract version": ([{**envelope(), "v": 2}], None, "v"),
    "reserved env overridden": (
        [envelope(envs={"ANTHROPIC_API_KEY": "sk-attacker"})], None, "ANTHROPIC_API_KEY"),
    "bad env name": ([envelope(envs={"A B": "1"})], None, "envs"),
    "two positional args": ([envelope(), envelope()], None, "2 positional"),
    "no args at all": ([], None, "0 positional"),
    "keyword args only": ([], {"message": envelope()}, "keyword"),
    "args and kwargs": ([envelope()], {"extra": 1}, "keyword"),
}


@pytest.mark.parametrize(("args", "kwargs", "mentions"), list(HOSTILE.values()),
                         ids=list(HOSTILE))
def test_malformed_task_message_is_refused_as_invalid_task(
    raw_app: Celery, worker: Worker, rdb: redis.Redis,
    args: list[Any], kwargs: dict[str, Any] | None, mentions: str,
) -> None:
    sent = raw_app.send_task(TASK_NAME, args=args, kwargs=kwargs)
    value = wait_result(sent, worker)
    assert isinstance(value, dict), f"the worker stored {value!r}, not an AgentResult"
    result = AgentResult.model_validate(value)
    assert result.task_id == sent.id
    assert result.status is TaskStatus.FAILED
    assert result.error is not None
    assert result.error.category is ErrorCategory.INVALID_TASK
    assert result.error.retryable is False
    assert mentions in result.error.message
    assert result.attempts == 0
    assert result.sandbox_id is None
    assert len(result.error.message) < 10_000  # a huge field is not echoed back whole
    record = rdb.hgetall(keys.task(sent.id))
    assert record.get(b"status") == b"failed"
    assert record.get(b"error") == b"invalid_task"
    assert rdb.get(keys.SIM_CREATED) in (None, b"0"), "a sandbox was created for it"
    assert_still_serving(raw_app, worker, rdb)


# -- messages that are not task messages at all ----------------------------------------------

def test_unknown_task_name_is_dropped(raw_app: Celery, worker: Worker, rdb: redis.Redis,
                                     redis_url: str) -> None:
    sent = raw_app.send_task("sandqueue.no_such_task", args=[envelope()], queue=QUEUE)
    wait_until(lambda: "sandqueue.no_such_task" in worker.log(), what="the worker to log it")
    assert "unregistered task" in worker.log().lower()
    assert_still_serving(raw_app, worker, rdb)
    assert rdb.get(keys.SIM_CREATED) == b"1"  # only the valid task's sandbox
    # Celery stores a NotRegistered failure; a producer asking for it gets a failed result.
    client = Client(Settings(_env_file=None, redis_url=redis_url))  # type: ignore[call-arg]
    try:
        outcome = client.get(sent.id).result()
    finally:
        client.celery.close()
        client.redis.close()
    assert outcome is not None
    assert outcome.status is TaskStatus.FAILED


def publish_raw(app: Celery, body: bytes | str, content_type: str, content_encoding: str,
                task_id: str) -> None:
    """Publish a Celery-protocol-2 message whose body is exactly `body`."""
    headers = {"lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id,
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "argsrepr": "", "kwargsrepr": "", "origin": "sqit"}
    with app.connection_for_write() as conn:
        conn.Producer().publish(body, exchange="", routing_key=QUEUE, serializer=None,
                                content_type=content_type, content_encoding=content_encoding,
                                headers=headers, properties={"correlation_id": task_id})


@pytest.mark.parametrize("body", ["{not json at all", "\x00\x01 binary garbage", ""],
                         ids=["broken-json", "binary", "empty"])
def test_non_json_body_does_not_hurt_the_worker(raw_app: Celery, worker: Worker,
                                                rdb: redis.Redis, body: str) -> None:
    task_id = str(uuid.uuid4())
    before = len(worker.log())
    publish_raw(raw_app, body, "application/json", "utf-8", task_id)
    wait_until(lambda: rdb.llen(QUEUE) == 0, what="the worker to take the message")
    wait_until(lambda: len(worker.log()) > before, what="the worker to log the refusal")
    assert_still_serving(raw_app, worker, rdb)
    assert rdb.get(keys.SIM_CREATED) == b"1"


def test_pickle_body_is_never_deserialized(raw_app: Celery, worker: Worker, rdb: redis.Redis,
                                           tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    task_id = str(uuid.uuid4())
    publish_raw(raw_app, pickle.dumps(((Exploit(),), {}, {})),
                "application/x-python-serialize", "binary", task_id)
    wait_until(lambda: rdb.llen(QUEUE) == 0, what="the worker to take the message")
    assert_still_serving(raw_app, worker, rdb)
    assert not marker.exists(), "the worker unpickled a message: remote code execution"
    # Refused as data: a failed/invalid_task result, stored as JSON (never a pickle).
    stored = raw_app.AsyncResult(task_id).get(timeout=10)
    assert stored["status"] == "failed"
    assert stored["error"]["category"] == "invalid_task"


@pytest.mark.parametrize("raw", [
    b"\xff\xfe not even a kombu envelope",
    b'{"hello": "world"}',
    b"[]",
    json.dumps({"body": "e30=", "content-encoding": "utf-8", "content-type": "application/json",
                "headers": {}, "properties": {"delivery_tag": "x", "body_encoding": "base64",
                                              "delivery_info": {"exchange": "",
                                                                "routing_key": QUEUE}}}).encode(),
], ids=["not-json", "json-not-envelope", "json-list", "envelope-without-task-headers"])
def test_garbage_pushed_onto_the_queue_does_not_hurt_the_worker(
    raw_app: Celery, worker: Worker, rdb: redis.Redis, raw: bytes
) -> None:
    rdb.lpush(QUEUE, raw)
    wait_until(lambda: rdb.llen(QUEUE) == 0, what="the worker to take the garbage")
    assert_still_serving(raw_app, worker, rdb)
