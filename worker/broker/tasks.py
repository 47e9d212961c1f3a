"""The Celery task: thin, like a web view. Decode, run, encode; map the runtime's outcomes
to Celery's (`Duplicate` -> `Ignore`: acknowledged, nothing stored; `HandBack` -> `Reject`
with requeue: back on the queue for another worker).

It accepts any arguments and validates them itself, so a malformed message becomes a
`failed`/`invalid_task` result instead of an exception that Celery would pickle or retry.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals
from celery.exceptions import Ignore, Reject

from sandqueue.contract import TASK_NAME
from worker import webhooks
from worker.broker.app import app, process_runtime
from worker.observe import start_telemetry
from worker.runtime import Duplicate, HandBack


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
          Strategy="worker.broker.internals:guarded_strategy",
          Request="worker.broker.internals:PrivateRequest")
def run_agent_task(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    runtime = process_runtime()
    try:
        result = runtime.handle(self.request.id, args, kwargs)
        webhooks.after_task(runtime, self.request.id, args, result)  # callback_url, if any
        return result
    except Duplicate:
        raise Ignore() from None
    except HandBack as e:
        raise Reject(str(e), requeue=True) from None


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Recovery and reaping run even while this worker is idle."""
    runtime = process_runtime()
    if sender is not None and getattr(sender, "hostname", None):
        runtime.worker_name = f"{sender.hostname}/{os.getpid()}"
    if sender is not None and getattr(sender, "app", None) is not None:
        runtime.queues = sorted(sender.app.amqp.queues.consume_from or ())
    runtime.start_maintenance()
    start_telemetry(runtime.settings, lambda: len(runtime.active_contexts()))
    webhooks.dispatcher(runtime.redis, runtime.settings)  # deliveries left by a dead worker


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    process_runtime().shutdown()
