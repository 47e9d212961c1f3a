"""A bare Celery app: the baseline that sandqueue's per-task overhead is measured against.

It uses sandqueue's own Celery configuration (`celery_config`: same broker and result
backend, JSON, acks late, prefetch 1, same transport options), so a difference in
throughput is what sandqueue does per task, not a difference in Celery settings. Started
by the harness as `celery -A bench.bare_app worker ...` with the same pool and concurrency
as the sandqueue worker it is compared with.

Each task returns the wall-clock time it started at, so the latency section can measure
submit-to-start for bare Celery the same way it does for sandqueue (which records
`started_at` in its task record).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from sandqueue.celeryconf import celery_config
from sandqueue.settings import load_settings

NOOP = "bench.noop"
SLEEP = "bench.sleep"

app = Celery("bench-bare")
app.conf.update(celery_config(load_settings()))


@app.task(name=NOOP)
def noop(*_args: Any, **_kwargs: Any) -> float:
    """Do nothing; takes (and ignores) the same message sandqueue's task receives."""
    return time.time()


@app.task(name=SLEEP)
def sleep(seconds: float, *_args: Any, **_kwargs: Any) -> float:
    """Wait `seconds` like a sandbox would (the latency section's bare counterpart)."""
    started = time.time()
    time.sleep(max(0.0, float(seconds)))
    return started
