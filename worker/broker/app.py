"""The Celery application of a worker (`sandqueue worker`, or `celery -A worker.broker.app
worker`) and the composition root: the process's `Runtime`, built explicitly.

Celery needs a module-level app to register the task on; that is the only thing built at
import. The runtime is built on first use in the worker process (after any fork), from
the settings, with the two things it needs from the broker side handed to it: whether a
result is stored, and how to recover dead workers' deliveries.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from dotenv import load_dotenv

from sandqueue.celeryconf import celery_config
from sandqueue.settings import Settings, load_settings
from worker.broker import internals, privacy
from worker.broker.recovery import recover_orphans
from worker.runtime import Runtime

# `${ENV}` references in tasks resolve from the worker's environment, `.env` included.
load_dotenv(override=False)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("sandqueue")
    app.conf.update(celery_config(settings))
    app.conf.update(worker_pool=settings.pool, worker_concurrency=settings.concurrency,
                    # Flower and `celery events` see this worker's tasks (never their args
                    # or results: worker/broker/privacy.py); a Redis PUBLISH per task phase.
                    worker_send_task_events=settings.task_events)
    return app


def build_runtime(app: Celery, settings: Settings) -> Runtime:
    """A worker process's runtime, wired to this Celery app."""
    runtime = Runtime(settings)
    runtime.result_exists = lambda task_id: bool(
        runtime.redis.exists(app.backend.get_key_for_task(task_id)))
    runtime.recover = lambda: recover_orphans(app, runtime.store, settings.lease_ttl_s)
    return runtime


internals.install()
app = create_app()
logging.getLogger("httpx").setLevel(logging.WARNING)
privacy.install_log_filters()

_lock = threading.Lock()
_runtime: Runtime | None = None


def process_runtime() -> Runtime:
    """This worker process's runtime (built once, on first use)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(app, load_settings())
        return _runtime


import worker.broker.tasks  # noqa: E402,F401  (registers the task on `app`)
