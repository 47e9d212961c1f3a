"""Celery configuration shared by producers and workers, derived from `Settings`.

Agent tasks are long and I/O-bound, so: JSON only (results are data, never pickles);
acknowledge late and re-queue when a worker dies; prefetch one at a time; and a broker
visibility timeout longer than any task (otherwise Redis re-delivers a running task and it
runs twice; `Settings` refuses a configuration where that could happen).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sandqueue.contract import TASK_NAME
from sandqueue.settings import Settings


def celery_url(redis_url: str) -> str:
    """The URL as Celery and kombu spell it: redis-py's `unix:///path?db=N` is their
    `redis+socket:///path?virtual_host=N`; redis:// and rediss:// are the same for all."""
    parts = urlsplit(redis_url)
    if parts.scheme != "unix":
        return redis_url
    query = dict(parse_qsl(parts.query))
    query["virtual_host"] = query.pop("db", "0")
    return f"redis+socket://{parts.netloc}{parts.path}?{urlencode(query)}"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Fail fast when Redis is down instead of hanging a producer.
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry_on_timeout": True,
        "health_check_interval": 25,
    }
    return {
        "broker_url": celery_url(settings.redis_url),
        "result_backend": celery_url(settings.redis_url),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "redis_socket_connect_timeout": 5,
        "redis_socket_timeout": 30,
        "redis_retry_on_timeout": True,
        "result_backend_thread_safe": True,
        # A task that finishes while Redis is down keeps its result: storing it is retried
        # (backoff up to 10 s) instead of being dropped.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        # redis-py caps a pool at 100 connections by default: too few for a worker running
        # hundreds of threads.
        "redis_max_connections": max(100, settings.concurrency * 2 + 20),
        "result_expires": settings.result_expires_s,
        "result_extended": False,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "task_track_started": False,
        "task_send_sent_event": False,
        "worker_send_task_events": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_pool_limit": 20,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
