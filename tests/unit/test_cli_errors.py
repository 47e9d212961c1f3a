"""The CLI's rough edges a new user meets: bad task ids, cancelling what has ended, `--json`
errors, typed `status --json`, and `batch status` with inputs in an unknown state.

Redis is fakeredis (patched into `Client`); nothing here needs a worker."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner, Result

from producer.api import Client, TaskHandle
from producer.batch import batch_key
from producer.cli import EXIT_ALREADY_ENDED, cli
from producer.taskinfo import TaskInfo
from sandqueue import keys
from sandqueue.artifacts import LocalStore
from sandqueue.contract import TaskStatus


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[fakeredis.FakeRedis]:
    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(Client, "redis", property(lambda self: fake))
    yield fake
    fake.close()


def run(*args: str) -> Result:
    """The CLI against a Redis nobody listens on, unless `fake_redis` is in use."""
    return CliRunner().invoke(cli, ["--redis-url", f"redis://127.0.0.1:{_free_port()}/0",
                                    *args])


def record(r: fakeredis.FakeRedis, task_id: str, **fields: Any) -> None:
    r.hset(keys.task(task_id), mapping={k: str(v) for k, v in fields.items()})


def no_traceback(result: Result) -> None:
    """The command ended by exiting, not by an exception escaping it."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exc_info)


# -- 7: empty and malformed ids ---------------------------------------------------------------

BAD_IDS = ["", "   ", "a b", "abc\n", "ab\x1b[31mc", "a\tb", "x" * 300]


@pytest.mark.parametrize("command", ["status", "result", "watch", "cancel"])
@pytest.mark.parametrize("task_id", BAD_IDS)
def test_bad_task_ids_exit_2_with_a_clear_message_before_redis(command: str,
                                                               task_id: str) -> None:
    # Nothing listens on the port: reaching Redis would exit 3, the id check exits 2 first.
    result = run(command, task_id)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "task id" in _one_line(result.stderr)
    assert "\x1b" not in result.stderr  # a control character is shown escaped, not sent
    assert result.stdout == ""


def test_one_bad_id_among_several_cancels_none(fake_redis: fakeredis.FakeRedis) -> None:
    record(fake_redis, "t-running", status="running")
    result = run("cancel", "t-running", "")
    assert result.exit_code == 2
    assert fake_redis.hget(keys.task("t-running"), "cancel") is None


# -- 8: cancel of a task that has ended -------------------------------------------------------

def test_cancel_of_a_finished_task_says_it_ended_and_exits_5(
        fake_redis: fakeredis.FakeRedis) -> None:
    record(fake_redis, "t-done", status="succeeded")
    result = run("cancel", "t-done")
    assert result.exit_code == EXIT_ALREADY_ENDED == 5, result.output
    assert result.stdout.strip() == "t-done already ended (succeeded); nothing to cancel"
    assert fake_redis.hget(keys.task("t-done"), "cancel") is None


def test_cancel_json_reports_each_id(fake_redis: fakeredis.FakeRedis) -> None:
    record(fake_redis, "t-run", status="running")
    record(fake_redis, "t-failed", status="failed")
    result = run("cancel", "t-run", "t-failed", "--json")
    assert result.exit_code == 5, result.output
    assert json.loads(result.stdout) == {"tasks": [
        {"id": "t-run", "outcome": "cancel_requested", "status": "running"},
        {"id": "t-failed", "outcome": "already_ended", "status": "failed"},
    ]}
    assert fake_redis.hget(keys.task("t-run"), "cancel") == b"1"
    assert fake_redis.zscore(keys.CANCELLED, "t-run") is not None
    assert fake_redis.zscore(keys.CANCELLED, "t-failed") is None


def test_cancel_of_open_tasks_exits_0(fake_redis: fakeredis.FakeRedis,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    stored: dict[str, Any] = {}
    backend = type("B", (), {"store_result": lambda self, t, r, s: stored.update({t: r})})()
    monkeypatch.setattr(Client, "celery", property(lambda self: type("C", (), {
        "backend": backend})()))
    record(fake_redis, "t-q", status="queued")
    result = run("cancel", "t-q")
    assert stored["t-q"]["status"] == "cancelled"  # a result, so waiters see the end
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "t-q cancelled (it had not started)"


# -- 9: --json covers errors ------------------------------------------------------------------

def test_json_error_for_an_invalid_task() -> None:
    result = run("submit", "hello", "--mcp", "githubOffical", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["error"] == "invalid_task"
    assert error["category"] == "usage"
    assert "githubOfficial" in error["message"]


def test_json_error_when_redis_is_unreachable() -> None:
    for args in (("submit", "hello", "--json"), ("status", "abc", "--json"),
                 ("batch", "status", "abc", "--json")):
        result = run(*args)
        no_traceback(result)
        assert result.exit_code == 3, (args, result.output)
        error = json.loads(result.stdout)
        assert (error["error"], error["category"]) == ("redis_unavailable", "unreachable")
        assert "REDIS_URL" in error["message"]


def test_json_error_for_a_bad_id_names_it() -> None:
    result = run("status", "", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {
        "error": "invalid_task_id", "category": "usage", "id": "",
        "message": "the task id is empty: give the id that `sandqueue submit` printed"}


@pytest.mark.parametrize("args", [("status", "--json"), ("submit", "x", "--max-turns", "0",
                                                          "--json"), ("nosuch", "--json")])
def test_json_error_for_usage_errors_click_finds(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert (error["error"], error["category"]) == ("usage_error", "usage")
    assert error["message"]


def test_json_error_for_a_bad_batch_file_lists_the_lines(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "fine"}\nnot json\n{"prompt": " "}\n', encoding="utf-8")
    result = run("batch", "run", str(source), "--json")
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert error["error"] == "invalid_task"
    assert [line["line"] for line in error["lines"]] == [2, 3]


def test_json_error_for_an_unknown_batch(fake_redis: fakeredis.FakeRedis) -> None:
    result = run("batch", "status", "nope", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == "unknown_batch"


# -- 10: status --json is typed ---------------------------------------------------------------

def test_status_json_gives_numbers_booleans_and_iso_timestamps(
        fake_redis: fakeredis.FakeRedis) -> None:
    submitted = 1764650000.25
    record(fake_redis, "t1", status="running", attempt=2, deliveries=1, cost_usd="0.0125",
           tool_calls=3, **{"tool:search": 2, "tool:fetch": 1}, cancel=1,
           submitted_at=submitted, worker="w1@host", sandbox_id="sbx-1")
    result = run("status", "t1", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["id"] == "t1"
    assert info["status"] == "running"
    assert info["attempt"] == 2 and info["deliveries"] == 1 and info["tool_calls"] == 3
    assert info["cost_usd"] == 0.0125
    assert info["cancel_requested"] is True
    assert info["tools"] == {"search": 2, "fetch": 1}
    stamp = datetime.fromisoformat(info["submitted_at"].replace("Z", "+00:00"))
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    assert stamp.timestamp() == submitted
    assert info["started_at"] is None
    assert TaskInfo.model_validate(info).attempt == 2  # the same shape reads back


def test_task_info_keeps_a_status_it_does_not_know() -> None:
    info = TaskInfo.from_record("t", {"status": "teleporting", "attempt": "x"})
    assert info.status == "teleporting"
    assert info.attempt is None  # unparseable: left out, not guessed
    assert TaskInfo.from_record("t", {"status": "queued"}).status is TaskStatus.QUEUED


def test_status_text_shows_a_new_status_value(fake_redis: fakeredis.FakeRedis) -> None:
    record(fake_redis, "t2", status="submitting")
    result = run("status", "t2")
    assert result.exit_code == 0, result.output
    assert result.stdout.split()[:2] == ["t2", "submitting"]


# -- 15: batch status with inputs in an unknown state ----------------------------------------

def _batch(r: fakeredis.FakeRedis, batch_id: str, items: dict[str, str]) -> None:
    r.hset(batch_key(batch_id), mapping={"total": len(items), "status": "running",
                                         "created_at": time.time()})
    r.hset(batch_key(batch_id, "items"), mapping=items)


def test_batch_status_exits_1_and_says_why_when_inputs_are_unknown(
        fake_redis: fakeredis.FakeRedis) -> None:
    _batch(fake_redis, "b1", {"a": "ta", "b": "tb", "c": "tc"})
    record(fake_redis, "ta", status="succeeded")
    record(fake_redis, "tb", status="queued")  # tc has no record at all
    result = run("batch", "status", "b1")
    assert result.exit_code == 1, result.output
    assert "  unknown: 1" in result.stdout and "  queued: 1" in result.stdout
    assert "1 input(s) are in an unknown state" in _one_line(result.stderr)

    result = run("batch", "status", "b1", "--json")
    assert result.exit_code == 1
    counts = json.loads(result.stdout)
    assert counts["by_status"]["unknown"] == 1 and counts["by_status"]["queued"] == 1
    assert counts["error"] == "unknown_inputs"


def test_batch_status_without_unknown_inputs_exits_0(fake_redis: fakeredis.FakeRedis) -> None:
    _batch(fake_redis, "b2", {"a": "ta"})
    record(fake_redis, "ta", status="running")
    result = run("batch", "status", "b2")
    assert result.exit_code == 0, result.output
    assert "unknown" not in result.output


# -- Ctrl-C -----------------------------------------------------------------------------------

def test_ctrl_c_while_submit_waits_exits_130_and_names_the_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: TaskHandle, **_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "submit", lambda self, task, queue=None: TaskHandle(self, "t9"))
    monkeypatch.setattr(TaskHandle, "wait", interrupted)
    result = run("submit", "hello", "--wait", "--json")
    no_traceback(result)
    assert result.exit_code == 130
    error = json.loads(result.stdout)
    assert (error["error"], error["category"], error["id"]) == ("interrupted", "interrupted",
                                                                "t9")
    assert "keeps running" in error["message"]


def test_cancel_takes_a_status_it_does_not_know_as_open(fake_redis: fakeredis.FakeRedis) -> None:
    record(fake_redis, "t-new", status="teleporting")  # e.g. written by a newer version
    result = run("cancel", "t-new", "--json")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tasks"] == [
        {"id": "t-new", "outcome": "cancel_requested", "status": "teleporting"}]


def test_a_damaged_artifact_is_not_reported_as_an_unreachable_store(
        fake_redis: fakeredis.FakeRedis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that do not match the result's sha256 will not mend on a retry: exit 2 with a
    code of its own, not 3 (unreachable), which a script would retry forever."""
    monkeypatch.setenv("SANDQUEUE_ARTIFACT_DIR", str(tmp_path / "store"))
    ref = LocalStore(tmp_path / "store").put("t-1", "files/a.txt", b"what the agent wrote")
    LocalStore(tmp_path / "store").put("t-1", "files/a.txt", b"changed in the store")
    monkeypatch.setattr(TaskHandle, "result", lambda self, **_: SimpleNamespace(
        artifacts=[ref]))
    result = run("artifacts", "t-1", "--out", str(tmp_path / "got"), "--json")
    no_traceback(result)
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["error"] == "artifact_damaged" and "sha256" in error["message"]
    assert not (tmp_path / "got/files/a.txt").exists()


def test_an_out_directory_that_cannot_be_made_is_a_usage_error(
        fake_redis: fakeredis.FakeRedis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDQUEUE_ARTIFACT_DIR", str(tmp_path / "store"))
    ref = LocalStore(tmp_path / "store").put("t-1", "files/a.txt", b"what the agent wrote")
    monkeypatch.setattr(TaskHandle, "result", lambda self, **_: SimpleNamespace(
        artifacts=[ref]))
    (tmp_path / "afile").write_text("a file, not a directory")
    result = run("artifacts", "t-1", "--out", str(tmp_path / "afile" / "sub"), "--json")
    no_traceback(result)
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["error"] == "usage" and "cannot make that directory" in error["message"]
