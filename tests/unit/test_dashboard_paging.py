"""The dashboard's listing helpers: an admin's all-tenant pages (`records.page` over the
all-tenants index), the phase timeline built from a task's events, and the login form's
redirect target."""

from __future__ import annotations

import random

import fakeredis
import pytest

from producer.http import records
from producer.http.dashboard import timeline
from producer.http.dashboard.pages import _safe_next
from producer.http.problems import Problem
from sandqueue import keys


def _fill(r: fakeredis.FakeRedis, seed: int = 7) -> dict[str, tuple[float, str]]:
    """Tasks of three tenants, many sharing a submit time (as a batch's do), indexed as the
    submit claim indexes them: under their tenant and in the all-tenants index."""
    rng = random.Random(seed)
    made: dict[str, tuple[float, str]] = {}
    for i in range(90):
        tenant = rng.choice(["acme", "globex", "initech"])
        at = 1000.0 + rng.randrange(20)  # ties within and across tenants
        task_id = f"t{i:03d}"
        r.zadd(keys.tenant_index(tenant), {task_id: at})
        r.zadd(keys.TASK_INDEX, {task_id: at})
        r.hset(keys.task(task_id), mapping={"status": rng.choice(["queued", "succeeded"]),
                                            "tenant": tenant, "submitted_at": at})
        made[task_id] = (at, tenant)
    return made


@pytest.mark.parametrize("limit", [1, 7, 50, 200])
def test_paging_across_tenants_lists_every_kept_task_once_newest_first(limit: int) -> None:
    r = fakeredis.FakeRedis()
    made = _fill(r)

    def keep(record: dict[str, str]) -> bool:
        return record.get("status") == "queued"

    seen: list[str] = []
    cursor = None
    for _ in range(200):
        found, cursor = records.page(r, "", limit=limit, cursor=cursor, keep=keep,
                                     chunk_size=3, index=keys.TASK_INDEX)
        assert len(found) <= limit
        seen += [task_id for task_id, _ in found]
        if cursor is None:
            break
    assert cursor is None, "paging never ended"
    wanted = {t for t in made if r.hget(keys.task(t), "status") == b"queued"}
    assert sorted(seen) == sorted(wanted)  # each once
    assert {made[t][1] for t in seen} == {"acme", "globex", "initech"}
    times = [made[t][0] for t in seen]
    assert times == sorted(times, reverse=True)  # newest first across tenants


def test_a_cursor_that_was_not_given_out_is_a_clear_400() -> None:
    with pytest.raises(Problem) as caught:
        records.page(fakeredis.FakeRedis(), "", limit=5, cursor="not-a-cursor",
                     keep=lambda _: True, index=keys.TASK_INDEX)
    assert caught.value.status == 400 and "cursor" in caught.value.detail


def test_the_timeline_times_each_phase_and_counts_retries_and_the_open_phase() -> None:
    events = [{"phase": "queued", "ts": 100.0},
              {"phase": "started", "ts": 102.0, "worker": "w1"},
              {"phase": "sandbox_created", "ts": 103.5, "attempt": 1},
              {"phase": "agent_started", "ts": 104.0},
              {"phase": "tool_call", "ts": 105.0, "name": "Bash"},
              {"phase": "retrying", "ts": 110.0, "attempt": 1},
              {"phase": "sandbox_created", "ts": 111.0, "attempt": 2},
              {"phase": "agent_started", "ts": 111.5}]
    marks = timeline.milestones(events)
    assert [m.phase for m in marks] == ["queued", "started", "sandbox_created",
                                        "agent_started", "retrying", "sandbox_created",
                                        "agent_started"]
    assert [m.since_prev_s for m in marks] == [None, 2.0, 1.5, 0.5, 6.0, 1.0, 0.5]
    assert marks[1].detail == "worker=w1"
    # still running at 120: the agent's second run counts up to now
    assert dict(timeline.phase_totals(marks, now=120.0)) == {
        "queue wait": 2.0, "sandbox start": 1.5, "gateway start": 0.5 + 0.5,
        "agent run": 6.0 + 8.5, "backoff": 1.0}
    assert timeline.tool_calls(events) == [(105.0, "Bash")]


@pytest.mark.parametrize(("asked", "goes_to"), [
    ("/tasks/abc?x=1", "/tasks/abc?x=1"), ("//evil.example/", "/"),
    ("https://evil.example/", "/"), ("/\\evil.example", "/"), ("", "/"),
    ("/x\r\nSet-Cookie: a=b", "/"), ("/", "/")])
def test_the_login_form_only_returns_to_a_page_of_this_site(asked: str, goes_to: str) -> None:
    assert _safe_next(asked) == goes_to


def test_the_batch_duration_histogram_puts_every_duration_in_one_bin() -> None:
    from producer.http.dashboard.batch_pages import histogram

    assert histogram([]) == []
    bins = histogram([0.0, 1.0, 1.0, 9.9, 10.0], bins=10)
    assert [n for _, n in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[0][0] == "1.00s" and bins[-1][0] == "10s"
