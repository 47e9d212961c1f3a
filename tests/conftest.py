"""Shared test setup: a clean environment so a developer's `.env` or keys never leak in."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_SCRUB = ("E2B_API_KEY", "ANTHROPIC_API_KEY", "REDIS_URL", "E2B_DOMAIN")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in list(os.environ):
        if name in _SCRUB or name.startswith("SANDQUEUE_"):
            monkeypatch.delenv(name, raising=False)
    # Settings read `.env` from the working directory: run each test where there is none.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    # Artifacts (session transcripts are saved after every run) go to a temporary store,
    # not the developer's ~/.sandqueue/artifacts.
    monkeypatch.setenv("SANDQUEUE_ARTIFACT_DIR", str(tmp_path_factory.mktemp("artifacts")))
