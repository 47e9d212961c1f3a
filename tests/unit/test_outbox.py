"""Submitting is safe against a crash at any point (issue: an interrupted submit stranded
tasks forever): claim + record are one atomic step, publishing is confirmed, and whoever
submits the same key later publishes what never went out. Runs the real Lua on fakeredis;
Celery's publishing is replaced by a recorder of the messages that would reach the queue."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from producer.api import Client
from producer.batch import submit_batch
from producer.outbox import fingerprint
from sandqueue import errors, keys
from sandqueue.contract import AgentResult, AgentTask, TaskStatus
from sandqueue.sealing import Sealer, generate_key, seal_mcp
from sandqueue.settings import Settings


class ProducerDied(BaseException):
    """Stands for Ctrl-C or kill -9 at one point of a submit (not an Exception: nothing
    may catch it, as nothing catches a KeyboardInterrupt)."""


@dataclass
class Queue:
    """The messages a submit put on the broker, and a switch to die while publishing."""

    messages: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    die_on_publish: bool = False

    def ids(self) -> Counter[str]:
        return Counter(task_id for task_id, _, _ in self.messages)


@dataclass
class _Backend:
    redis: fakeredis.FakeRedis

    def store_result(self, task_id: str, result: dict[str, Any], state: str) -> None:
        self.redis.set(f"celery-task-meta-{task_id}", repr(result))


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[Queue]:
    q = Queue()
    r = fakeredis.FakeRedis()

    def publish(self: Client, messages: list[tuple[str, dict[str, Any], str]]) -> None:
        if q.die_on_publish and messages:
            raise ProducerDied()
        q.messages.extend(messages)

    celery = type("C", (), {"backend": _Backend(r)})()
    monkeypatch.setattr(Client, "redis", property(lambda self: r))
    monkeypatch.setattr(Client, "celery", property(lambda self: celery))
    monkeypatch.setattr(Client, "_publish", publish)
    yield q
    r.close()


def client(**settings: Any) -> Client:
    return Client(Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0", **settings))


def status(c: Client, task_id: str) -> str:
    return c.store.get(task_id).get("status", "")


# -- one key, one message ---------------------------------------------------------------------

def test_two_submits_with_one_key_put_exactly_one_message_on_the_queue(queue: Queue) -> None:
    c = client()
    first = c.submit("triage #1", idempotency_key="k1")
    second = c.submit("triage #1", idempotency_key="k1")
    assert second.id == first.id and second.duplicate and not first.duplicate
    assert queue.ids() == {first.id: 1}
    assert status(c, first.id) == "queued"


def test_one_key_twice_in_one_chunk_is_one_task(queue: Queue) -> None:
    c = client()
    task = c.prepare("same", idempotency_key="k")
    a, b = c.submit_many([task, task])
    assert a.id == b.id and b.duplicate
    assert queue.ids() == {a.id: 1}


def test_a_confirmed_message_drops_its_kept_body(queue: Queue) -> None:
    c = client()
    handle = c.submit("hello", idempotency_key="k")
    assert "message" not in c.store.get(handle.id)


# -- a producer that dies between claiming and publishing ------------------------------------

def test_a_submit_that_died_before_publishing_is_published_by_the_next_submit(
        queue: Queue) -> None:
    c = client()
    queue.die_on_publish = True
    with pytest.raises(ProducerDied):
        c.submit("triage #7", idempotency_key="k7")
    [stranded] = [k.decode().removeprefix(keys.task("")) for k in c.redis.keys(keys.task("*"))]
    assert status(c, stranded) == TaskStatus.SUBMITTING.value
    assert queue.messages == []

    queue.die_on_publish = False
    again = c.submit("triage #7", idempotency_key="k7")
    assert again.id == stranded and again.duplicate
    assert queue.ids() == {stranded: 1}
    [(_, body, _)] = queue.messages
    assert body["task"]["prompt"] == "triage #7"
    assert status(c, stranded) == "queued"


def test_waiting_on_a_stranded_task_publishes_it(queue: Queue) -> None:
    c = client()
    queue.die_on_publish = True
    with pytest.raises(ProducerDied):
        c.submit("lonely", idempotency_key="k")
    [task_id] = [k.decode().removeprefix(keys.task("")) for k in c.redis.keys(keys.task("*"))]
    queue.die_on_publish = False
    assert c.republish_stranded([task_id], older_than_s=60) == []  # its producer may be alive
    assert c.republish_stranded([task_id]) == [task_id]
    assert queue.ids() == {task_id: 1}
    assert c.republish_stranded([task_id]) == []  # confirmed: never twice


def test_a_key_whose_task_was_never_recorded_is_taken_over(queue: Queue) -> None:
    # What an older producer left behind: the key bound, no record, no message.
    c = client()
    c.redis.set(keys.idempotency("k"), "ghost-task")
    handle = c.submit("hello", idempotency_key="k")
    assert handle.id != "ghost-task" and not handle.duplicate
    assert queue.ids() == {handle.id: 1}


def test_a_worker_that_began_before_the_confirm_keeps_its_status(queue: Queue) -> None:
    c = client()
    queue.die_on_publish = True
    with pytest.raises(ProducerDied):
        c.submit("x", idempotency_key="k")
    [task_id] = [k.decode().removeprefix(keys.task("")) for k in c.redis.keys(keys.task("*"))]
    c.redis.hset(keys.task(task_id), "status", "running")
    queue.die_on_publish = False
    c.submit("x", idempotency_key="k")
    assert queue.messages == []  # running is not stranded
    assert status(c, task_id) == "running"


# -- a key reused for another task ------------------------------------------------------------

def test_reusing_a_key_for_a_different_task_names_the_existing_task(queue: Queue) -> None:
    c = client()
    first = c.submit("open an issue", idempotency_key="k")
    with pytest.raises(errors.InvalidTask) as e:
        c.submit("close every issue", idempotency_key="k")
    assert first.id in e.value.message and "different task" in e.value.message
    assert queue.ids() == {first.id: 1}


def test_a_conflict_claims_nothing_of_its_chunk(queue: Queue) -> None:
    c = client()
    c.submit("a", idempotency_key="k-a")
    tasks = [c.prepare("b", idempotency_key="k-b"), c.prepare("other", idempotency_key="k-a")]
    with pytest.raises(errors.InvalidTask):
        c.submit_many(tasks)
    assert c.redis.get(keys.idempotency("k-b")) is None
    assert len(queue.messages) == 1


def test_fingerprint_ignores_the_fresh_iv_of_sealed_values() -> None:
    sealer = Sealer(generate_key())
    mcp = {"notion": {"internalIntegrationToken": "ntn_123456789"}}
    one = AgentTask(prompt="p", mcp=seal_mcp(mcp, sealer))
    two = AgentTask(prompt="p", mcp=seal_mcp(mcp, sealer))
    assert one.mcp != two.mcp
    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(AgentTask(prompt="q", mcp=one.mcp))
    assert fingerprint(one) == fingerprint(one.model_copy(update={"idempotency_key": "x"}))


# -- batches ----------------------------------------------------------------------------------

def test_rerunning_submit_batch_publishes_nothing(queue: Queue) -> None:
    c = client()
    tasks: list[Any] = [{"id": f"in-{i}", "prompt": f"item {i}"} for i in range(25)]
    first = submit_batch([dict(t) for t in tasks], batch_id="b1", client=c)
    assert len(queue.messages) == 25
    again = submit_batch([dict(t) for t in tasks], batch_id="b1", client=c)
    assert len(queue.messages) == 25
    assert sorted(again._pending) == sorted(first._pending)


def test_submit_batch_after_a_crash_publishes_only_what_never_went_out(queue: Queue) -> None:
    c = client()
    tasks: list[Any] = [{"id": f"in-{i}", "prompt": f"item {i}"} for i in range(2500)]
    published = 0

    def die_after_first_chunk(self: Client, messages: list[Any]) -> None:
        nonlocal published
        if not messages:
            return
        if published:
            raise ProducerDied()
        published += 1
        queue.messages.extend(messages)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Client, "_publish", die_after_first_chunk)
        with pytest.raises(ProducerDied):
            submit_batch([dict(t) for t in tasks], batch_id="b2", client=c)
    assert len(queue.messages) == 1000
    handle = submit_batch([dict(t) for t in tasks], batch_id="b2", client=c)
    assert sorted(queue.ids().values()) == [1] * 2500
    assert len(handle._pending) == 2500


# -- cancelling a task nobody holds -----------------------------------------------------------

def test_cancelling_a_queued_task_ends_it_at_once(queue: Queue) -> None:
    c = client()
    handle = c.submit("never runs")
    assert c.cancel_outcomes([handle.id]) == {handle.id: ("cancelled", None)}
    assert status(c, handle.id) == "cancelled"
    assert c.redis.get(f"celery-task-meta-{handle.id}") is not None
    assert c.cancel_outcomes([handle.id]) == {handle.id: ("ended", "cancelled")}


def test_cancelling_a_running_task_asks_its_worker(queue: Queue) -> None:
    c = client()
    handle = c.submit("runs")
    c.redis.hset(keys.task(handle.id), "status", "running")
    c.redis.zadd(keys.RUNNING, {handle.id: 9e12})
    assert c.cancel_outcomes([handle.id, "nope"]) == {handle.id: ("requested", None),
                                                       "nope": ("unknown", None)}
    assert c.redis.zscore(keys.CANCELLED, handle.id) is not None
    assert status(c, handle.id) == "running"


def test_a_batch_with_sealed_secrets_is_the_same_batch_when_run_again(queue: Queue) -> None:
    # Sealing uses a fresh IV each time: the batch id must not depend on the ciphertext
    c = client(secret_keys=generate_key())
    tasks = [{"id": f"in-{i}", "prompt": f"item {i}",
              "mcp": {"notion": {"internalIntegrationToken": "ntn_secret_123456"}}}
             for i in range(3)]
    first = submit_batch([dict(t) for t in tasks], client=c)
    again = submit_batch([dict(t) for t in tasks], client=c)
    assert again.id == first.id
    assert len(queue.messages) == 3


def test_a_tenants_unfinished_tasks_are_counted_and_ended_ones_pruned(queue: Queue) -> None:
    c = client()
    handles = [c.submit(f"t{i}", labels={"tenant": "acme"}) for i in range(3)]
    c.submit("other", labels={"tenant": "zeta"})
    assert c.outbox.open_count("acme", at_least=10) == 3
    c.cancel_outcomes([handles[0].id])           # ends at once: removed
    assert c.outbox.open_count("acme", at_least=10) == 2
    c.redis.hset(keys.task(handles[1].id), "status", "succeeded")  # ended unseen
    assert c.outbox.open_count("acme", at_least=10) == 2          # below the limit: cheap
    assert c.outbox.open_count("acme", at_least=2) == 1           # at it: pruned, exact


def test_a_task_whose_record_expired_reports_the_status_of_its_result(
        queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.api import TaskHandle

    c = client()
    failed = AgentResult(task_id="t-old", status=TaskStatus.FAILED)
    monkeypatch.setattr(TaskHandle, "result", lambda self: failed)
    assert c.get("t-old").status() is TaskStatus.FAILED  # not "succeeded"
