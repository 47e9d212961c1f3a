"""An E2B outage before the agent runs does not fail tasks: creation failures have no side
effects, so the worker retries them with backoff until the task's deadline (real worker
process, real redis-server, the sim provider failing its first creations)."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import RunCli, StartWorker

pytestmark = pytest.mark.integration


def test_a_task_survives_six_consecutive_creation_5xx_and_succeeds(
        cli: RunCli, worker_factory: StartWorker) -> None:
    # Given a worker whose infrastructure backoff is real but short
    worker_factory(concurrency=2, env={"SANDQUEUE_BACKOFF_SCALE": "1",
                                       "SANDQUEUE_INFRA_BACKOFF_S": "0.1",
                                       "SANDQUEUE_INFRA_BACKOFF_MAX_S": "0.5"})
    # When E2B answers 503 to the first six creations (three times max_attempts)
    code, out, err = cli("submit", "ride it out", "--env", "SIM_FAIL=create:unavailable:6",
                         "--env", "SIM_LATENCY_S=0.1", "--timeout", "60", "--wait",
                         "--wait-timeout", "60", "--json")
    # Then the task succeeds, with the outage in its result
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded"
    assert (result["infra_retries"], result["agent_runs"]) == (6, 1)
    assert [a["outcome"] for a in result["attempt_log"]] == (
        ["sandbox_unavailable"] * 6 + ["succeeded"])
    assert sum(a["retried"] for a in result["attempt_log"]) == 6
