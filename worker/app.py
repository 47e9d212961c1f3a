"""The Celery application of a worker: `celery -A worker.app worker` or `sandqueue worker`."""

from __future__ import annotations

import logging

from celery import Celery
from dotenv import load_dotenv

from sandqueue.celeryconf import celery_config
from sandqueue.settings import Settings, load_settings
from worker import guards, privacy

# `${ENV}` references in tasks resolve from the worker's environment, `.env` included.
load_dotenv(override=False)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("sandqueue")
    app.conf.update(celery_config(settings))
    app.conf.update(worker_pool=settings.pool, worker_concurrency=settings.concurrency,
                    # Flower and `celery events` see this worker's tasks (never their args
                    # or results: worker/privacy.py); a Redis PUBLISH per task phase.
                    worker_send_task_events=settings.task_events)
    return app


guards.install()
app = create_app()
logging.getLogger("httpx").setLevel(logging.WARNING)
privacy.install_log_filters()

import worker.tasks  # noqa: E402,F401  (registers the task on `app`)
