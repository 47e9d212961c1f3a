"""The Celery task: thin, like a web view. Decode, run the pipeline, encode the result.

It accepts any arguments and validates them itself, so a malformed message becomes a
`failed`/`invalid_task` result instead of an exception that Celery would pickle or retry.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from sandqueue.contract import TASK_NAME
from worker import webhooks
from worker.app import app
from worker.runtime import get_runtime


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
          Strategy="worker.guards:guarded_strategy")
def run_agent_task(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    result = get_runtime().handle(self.request.id, args, kwargs)
    webhooks.after_task(get_runtime(), self.request.id, args, result)  # callback_url, if any
    return result


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Recovery and reaping run even while this worker is idle."""
    runtime = get_runtime()
    if sender is not None and getattr(sender, "hostname", None):
        runtime.worker_name = f"{sender.hostname}/{os.getpid()}"
    runtime.start_maintenance()
    webhooks.dispatcher(runtime.redis, runtime.settings)  # deliveries left by a dead worker


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    get_runtime().shutdown()
