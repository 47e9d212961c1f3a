"""Every use of Celery's and kombu's private API, in one module.

Each one exists because the public API cannot do the job; each is pinned by a test in
tests/unit/test_broker_internals.py that fails clearly when an upgrade changes it, and the
versions they were verified with are pinned in pyproject.toml.

- `celery.worker.strategy.default`: wrapped, so a message it cannot parse is refused,
  not fatal (`guarded_strategy`);
- `celery.worker.request.Request` `_request_dict`, `_argsrepr`, `_kwargsrepr`: prompts
  stay out of task events and trace logs (`PrivateRequest`);
- `kombu.transport.redis.QoS.restore_unacked_once` and `.ack`: a worker survives a Redis
  restart with tasks in flight (`GuardedQoS`);
- `kombu.transport.redis.Channel._brpop_read` (with `_queue_cycle`, `_in_poll`,
  `_flush_brpop_reauth`, `connection._deliver`): queue entries that are not kombu
  envelopes go to the dead-letter list (`GuardedChannel`);
- `Channel.unacked_key`, `.unacked_index_key`, `.qos.restore_by_tag`: a dead worker's
  deliveries are found and put back (`unacked_older_than`, `restore`, `drop`).

Malformed broker messages must not take a worker down: Celery and kombu treat some as
unrecoverable (an empty JSON body crashes the task strategy, a queue entry that is not a
kombu envelope crashes the consumer loop), and with acks_late the same message then crashes
every worker that takes it next. The guards refuse such messages instead: logged, moved to
the `sq:deadletter` list for inspection, never executed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery.worker import strategy as celery_strategy
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from sandqueue import keys
from worker.broker.privacy import ARGS_REPR, KWARGS_REPR, summarize

log = logging.getLogger(__name__)

DEADLETTER = keys.DEADLETTER


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, but a message it cannot even parse is rejected, not fatal."""
    handler = celery_strategy.default(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                             **kw: Any) -> Any:
        try:
            return handler(message, body, ack, reject, callbacks, **kw)
        except Exception as e:
            task_id = (getattr(message, "headers", None) or {}).get("id")
            log.error("refused a malformed message for %s (task id %s): %s: %s",
                      task.name, task_id, type(e).__name__, e)
            if task_id:
                from worker.broker.app import process_runtime

                result = process_runtime().invalid_result(str(task_id),
                                                      f"unreadable message ({type(e).__name__})")
                task.backend.store_result(task_id, result, "SUCCESS")
            try:
                message.reject(requeue=False)
            except Exception as reject_error:  # already gone; nothing more to do
                log.warning("could not reject the malformed message: %s", reject_error)
            return None

    return task_message_handler


class GuardedQoS(kombu_redis.QoS):
    """Restoring unacknowledged messages when the connection closes must not be fatal.

    When Redis goes away, Celery closes the connection, and kombu then tries to put the
    worker's unacknowledged messages back on the queue over that very connection, which
    has already been released: an AttributeError that ends the worker ("Unrecoverable
    error") instead of letting it reconnect. Those messages stay in Redis's unacked hash;
    the tasks keep running here, and if this worker dies, sandqueue's recovery
    (`worker/broker/recovery.py`) puts them back.
    """

    def restore_unacked_once(self, stderr: Any = None) -> None:
        try:
            super().restore_unacked_once(stderr)
        except Exception as e:
            log.warning("could not put unacknowledged messages back (%s: %s); recovery of "
                        "dead workers' tasks will", type(e).__name__, e)

    def ack(self, delivery_tag: Any) -> None:
        """A task that finishes after its channel died cannot be acknowledged on it. Its
        result is stored; the message stays in the unacked hash until recovery re-queues it,
        and that delivery is ignored because the task has finished."""
        try:
            super().ack(delivery_tag)
        except AttributeError as e:
            log.warning("could not acknowledge %s on a closed channel (%s); the finished "
                        "task's message will be recovered and ignored", delivery_tag, e)


class GuardedChannel(kombu_redis.Channel):
    """Moves queue entries that are not kombu envelopes to the dead-letter list."""

    QoS = GuardedQoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP",
                                                       **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest_item:
                raise kombu_redis.Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                payload = json.loads(bytes_to_str(item))
                if not isinstance(payload, dict) or not isinstance(payload.get("properties"),
                                                                   dict):
                    raise ValueError("not a kombu message envelope")
            except (ValueError, TypeError, UnicodeDecodeError) as e:
                log.error("moved a malformed entry of queue %s to %s: %s", dest, DEADLETTER, e)
                self.client.lpush(DEADLETTER, item)
                self.client.ltrim(DEADLETTER, 0, 9999)
                raise kombu_redis.Empty() from None
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


def install() -> None:
    """Use the guarded channel for every Redis connection of this (worker) process."""
    kombu_redis.Transport.Channel = GuardedChannel


class PrivateRequest(Request):
    """The worker's request for agent tasks: events and logs never see args or results."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._argsrepr = ARGS_REPR
        self._kwargsrepr = KWARGS_REPR
        # The trace (success/failure log lines and their `extra` data) reads these.
        self._request_dict["argsrepr"] = ARGS_REPR
        self._request_dict["kwargsrepr"] = KWARGS_REPR

    def send_event(self, type: str, **fields: Any) -> None:
        if "result" in fields:
            fields["result"] = summarize(fields["result"])
        for name, placeholder in (("args", ARGS_REPR), ("kwargs", KWARGS_REPR)):
            if name in fields:
                fields[name] = placeholder
        super().send_event(type, **fields)


# -- a dead worker's deliveries (recovery) ----------------------------------------------------

def unacked_older_than(channel: kombu_redis.Channel, before: float,
                       limit: int) -> list[tuple[bytes, bytes | None]]:
    """(delivery tag, raw message) of deliveries unacknowledged since before `before`."""
    client = channel.client
    tags = client.zrangebyscore(channel.unacked_index_key, "-inf", before, start=0, num=limit)
    return [(tag, client.hget(channel.unacked_key, tag)) for tag in tags]


def drop(channel: kombu_redis.Channel, tag: bytes) -> None:
    """Forget a delivery whose task has finished (its ack was lost)."""
    channel.client.pipeline().hdel(channel.unacked_key, tag).zrem(
        channel.unacked_index_key, tag).execute()


def restore(channel: kombu_redis.Channel, tag: bytes) -> None:
    """Move a delivery back onto its queue (moved, not copied: the visibility timeout will
    not deliver it again), rightmost: consumed next, it has waited long enough."""
    channel.qos.restore_by_tag(tag, client=channel.client, leftmost=False)
