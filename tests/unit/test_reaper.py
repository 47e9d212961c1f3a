"""The reaper kills exactly the sandboxes no running task owns."""

from __future__ import annotations

import time

import fakeredis

from sandqueue.settings import Settings
from sandqueue.store import TaskStore
from worker.reaper import reap
from worker.sandbox.base import SandboxSpec
from worker.sandbox.sim import SimProvider


def _setup() -> tuple[SimProvider, TaskStore, Settings]:
    settings = Settings(_env_file=None, sandbox="sim", sim_create_latency_s=0,  # type: ignore[arg-type]
                        lease_ttl_s=5)
    r = fakeredis.FakeRedis()
    return SimProvider(settings, r), TaskStore(r, 3600), settings


def _sandbox(provider: SimProvider, task_id: str, attempt: int = 1,
             deadline_in_s: float = 600) -> str:
    spec = SandboxSpec(task_id=task_id, attempt=attempt, lifetime_s=900,
                       deadline_at=time.time() + deadline_in_s)
    return provider.create(spec).sandbox_id


def _age(provider: SimProvider, seconds: float) -> None:
    """Pretend every live sandbox was started `seconds` ago."""
    import json

    from sandqueue import keys

    r = provider.registry.r
    assert r is not None
    for sid in r.smembers(keys.SIM_LIVE):
        key = keys.sim_sandbox(sid.decode())
        record = json.loads(r.get(key))
        record["started_at"] -= seconds
        r.set(key, json.dumps(record))


def test_reaper_kills_orphans_and_spares_running_tasks() -> None:
    provider, store, settings = _setup()
    # Given: a healthy running task (live lease), a finished task, a superseded attempt,
    # a task whose worker died (no lease), and one past its deadline.
    store.begin("running", 600, "w1", lease_ttl_s=60)  # attempt 1 under a live lease
    healthy = _sandbox(provider, "running")
    store.begin("done", 600, "w1", lease_ttl_s=60)
    store.update("done", status="succeeded")
    finished = _sandbox(provider, "done")
    store.begin("retry", 600, "w1", lease_ttl_s=60)
    store.next_attempt("retry")
    superseded = _sandbox(provider, "retry", attempt=1)
    current = _sandbox(provider, "retry", attempt=2)
    store.begin("dead", 600, "w-dead", lease_ttl_s=-1)  # its worker stopped renewing
    lost = _sandbox(provider, "dead")
    store.begin("late", 600, "w1", lease_ttl_s=60)
    late = _sandbox(provider, "late", deadline_in_s=-(settings.sandbox_grace_s + 5))
    _age(provider, 60)

    # When
    dry = {v.sandbox_id: v.reason for v in reap(provider, store, settings, dry_run=True)}
    assert len(provider.list_live()) == 6, "a dry run kills nothing"
    verdicts = {v.sandbox_id: v for v in reap(provider, store, settings)}

    # Then
    assert dry == {sid: v.reason for sid, v in verdicts.items()}
    assert verdicts[healthy].reason is None and verdicts[current].reason is None
    assert "finished" in (verdicts[finished].reason or "")
    assert "superseded" in (verdicts[superseded].reason or "")
    assert "lease" in (verdicts[lost].reason or "")
    assert "deadline" in (verdicts[late].reason or "")
    assert {s.sandbox_id for s in provider.list_live()} == {healthy, current}


def test_a_young_sandbox_is_not_reaped_before_its_lease_could_exist() -> None:
    """A sandbox created a moment ago whose lease is not visible yet is left alone."""
    provider, store, settings = _setup()
    store.begin("new", 600, "w1", lease_ttl_s=-1)
    sid = _sandbox(provider, "new")
    assert [v.reason for v in reap(provider, store, settings) if v.sandbox_id == sid] == [None]


def test_a_sandbox_of_an_unknown_task_is_reaped() -> None:
    provider, store, settings = _setup()
    _sandbox(provider, "never-submitted")
    [verdict] = reap(provider, store, settings)
    assert verdict.killed and "unknown" in (verdict.reason or "")
