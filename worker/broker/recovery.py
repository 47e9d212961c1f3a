"""Crash safety: leases on running tasks, and handing a dead worker's tasks back.

The Redis broker re-delivers an unacknowledged task only after its visibility timeout, which
must exceed the longest task (hours), or tasks run twice. So a task that a `kill -9`ed
worker was running would sit for hours. Instead, each worker renews a short lease on every
task it runs (`sq:running`), and every worker periodically looks at the broker's
unacknowledged deliveries: one older than a lease whose task holds no live lease belongs to
a dead worker, and is put back on its queue (kombu's own restore, so the message is moved,
not copied, and the visibility timeout will not deliver it a second time).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from celery import Celery

from sandqueue import batchdone
from sandqueue.contract import FINAL_STATUSES, TaskStatus
from sandqueue.store import TaskStore
from worker.broker import internals

if TYPE_CHECKING:
    from kombu.transport.redis import Channel

log = logging.getLogger(__name__)

FINAL = {s.value for s in FINAL_STATUSES}


def _task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def recover_orphans(app: Celery, store: TaskStore, lease_ttl_s: float,
                    limit: int = 200) -> list[str]:
    """Put back on their queues the deliveries of workers that died. Returns task ids."""
    recovered: list[str] = []
    with app.connection_for_write() as conn:
        channel: Channel = conn.default_channel  # type: ignore[assignment]
        client = channel.client
        for tag, raw in internals.unacked_older_than(channel, time.time() - 2 * lease_ttl_s,
                                                     limit):
            task_id = _task_id(raw) if raw is not None else None
            if task_id is None:
                continue
            if store.has_live_lease(task_id):
                continue  # alive: a long task on a healthy worker
            record = store.get(task_id)
            status = record.get("status")
            if status in FINAL or client.exists(app.backend.get_key_for_task(task_id)):
                # It finished, but its worker could not acknowledge the message (Redis was
                # down): drop the message, never run the task again.
                internals.drop(channel, tag)
                store.claim_expired(task_id)
                if record.get("batch"):  # its worker may have died before telling its batch
                    batchdone.task_ended(store.r, record["batch"], task_id, store.ttl_s)
                log.info("task %s: finished, but its message was never acknowledged; dropped",
                         task_id)
                continue
            store.claim_expired(task_id)
            internals.restore(channel, tag)
            store.update(task_id, status=TaskStatus.QUEUED, recovered_at=time.time())
            recovered.append(task_id)
            log.warning("task %s: its worker stopped renewing the lease; put back on the queue",
                        task_id)
    return recovered
