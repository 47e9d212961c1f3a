"""Fleet-wide limits in Redis: slots are leases, creations are rate-limited, 429s slow down.

Runs the real Lua script on fakeredis (it embeds a Lua interpreter).
"""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from sandqueue import errors
from sandqueue.contract import AgentTask
from sandqueue.settings import Settings
from worker.limits import COOLDOWN, SANDBOXES, Limiter, Slot, parse_key_limits


def _limiter(**overrides: object) -> Limiter:
    settings = Settings(_env_file=None, sandbox="sim", lease_ttl_s=2, **overrides)  # type: ignore[arg-type]
    return Limiter(fakeredis.FakeRedis(), settings)


def test_sandbox_slots_cap_live_sandboxes_across_holders() -> None:
    """Given a cap of 2, a third holder waits until one of the first two releases."""
    lim = _limiter(max_live_sandboxes=2)
    slots = lim.sandbox_slots()
    assert lim.try_acquire("a", slots, rate=False) == 0
    assert lim.try_acquire("b", slots, rate=False) == 0
    assert lim.try_acquire("c", slots, rate=False) > 0
    lim.release("a")
    assert lim.try_acquire("c", slots, rate=False) == 0
    assert lim.r.zcard(SANDBOXES) == 2


def test_a_crashed_holders_slot_expires_by_itself() -> None:
    """Slots are leases: a holder that stops renewing loses its slot after the lease."""
    lim = _limiter(max_live_sandboxes=1)
    slots = lim.sandbox_slots()
    assert lim.try_acquire("dead", slots, rate=False) == 0
    assert lim.try_acquire("next", slots, rate=False) > 0
    lim.r.zadd(SANDBOXES, {"dead": time.time() - 1})  # its lease ran out
    assert lim.try_acquire("next", slots, rate=False) == 0


def test_renew_keeps_a_live_holders_slot() -> None:
    lim = _limiter(max_live_sandboxes=1)
    assert lim.try_acquire("a", lim.sandbox_slots(), rate=False) == 0
    before = lim.r.zscore(SANDBOXES, "a")
    time.sleep(0.05)
    lim.renew()
    assert lim.r.zscore(SANDBOXES, "a") > before


def test_all_or_nothing_across_several_limits() -> None:
    """A task that gets its per-key slot but not the global one takes neither."""
    lim = _limiter(max_live_sandboxes=1)
    tenant = Slot("sq:limit:key:label.tenant:a", 5)
    assert lim.try_acquire("x", [Slot(SANDBOXES, 1)], rate=False) == 0
    assert lim.try_acquire("y", [tenant, Slot(SANDBOXES, 1)], rate=False) > 0
    assert lim.r.zcard(tenant.key) == 0


def test_creation_rate_is_a_token_bucket() -> None:
    """At 2 creations/s with a burst of 2, the third creation in a row must wait ~0.5 s."""
    lim = _limiter(max_creates_per_s=2)
    assert lim.try_acquire("a", [], rate=True) == 0
    assert lim.try_acquire("b", [], rate=True) == 0
    wait = lim.try_acquire("c", [], rate=True)
    assert 0.1 < wait <= 0.5


def test_slow_down_pauses_creations_for_retry_after() -> None:
    lim = _limiter(max_creates_per_s=100)
    lim.slow_down(3.0)
    wait = lim.try_acquire("a", [], rate=True)
    assert 2.0 < wait <= 3.0
    lim.r.delete(COOLDOWN)  # the pause is over; the half rate stays for a minute
    assert lim.try_acquire("a", [], rate=True) == 0


def test_acquire_waits_for_a_release_instead_of_failing() -> None:
    """Given a full fleet, a waiter gets the slot soon after a holder releases it."""
    lim = _limiter(max_live_sandboxes=1)
    slots = lim.sandbox_slots()
    lim.try_acquire("holder", slots, rate=False)
    threading.Timer(0.3, lambda: lim.release("holder")).start()
    t0 = time.monotonic()
    lim.acquire("waiter", slots, rate=False, until=time.time() + 5)
    assert 0.25 < time.monotonic() - t0 < 2.5


def test_acquire_gives_up_at_the_deadline() -> None:
    lim = _limiter(max_live_sandboxes=1)
    lim.try_acquire("holder", lim.sandbox_slots(), rate=False)
    with pytest.raises(errors.DeadlineExceeded):
        lim.acquire("waiter", lim.sandbox_slots(), rate=False, until=time.time() + 0.3)


def test_per_key_slots_use_labels_and_credential_digests() -> None:
    lim = _limiter(key_limits="label.tenant=2,credential=1")
    task = AgentTask(prompt="x", labels={"tenant": "acme"})
    slots = lim.task_slots(task, ["ghp_secret_value"])
    keys = {s.key for s in slots}
    assert "sq:limit:key:label.tenant:acme" in keys
    assert not any("ghp_secret_value" in k for k in keys), "a credential must not appear in clear"
    assert len(slots) == 2


def test_e2b_defaults_follow_the_hobby_plan_and_sim_is_unlimited() -> None:
    e2b = Settings(_env_file=None, e2b_api_key="k")  # type: ignore[arg-type]
    sim = Settings(_env_file=None)
    assert (e2b.live_sandbox_limit, e2b.create_rate_limit) == (20, 1.0)
    assert (sim.live_sandbox_limit, sim.create_rate_limit) == (None, None)


@pytest.mark.parametrize("spec", ["tenant=5", "label.tenant=0", "credential=x", "label.t"])
def test_bad_key_limits_are_refused_with_the_fix(spec: str) -> None:
    with pytest.raises(errors.ConfigError, match="SANDQUEUE_KEY_LIMITS"):
        parse_key_limits(spec)
