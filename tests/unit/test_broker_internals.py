"""Every private Celery/kombu symbol worker/broker/internals.py relies on, one test each:
an upgrade that renames or reshapes one fails here, by name, instead of in production.
pyproject.toml pins the versions these were verified with (celery/kombu 5.5-5.7)."""

from __future__ import annotations

import inspect

import pytest
from celery.worker import strategy
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis

from worker.broker import internals


def params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_celery_default_strategy_takes_task_app_consumer() -> None:
    assert params(strategy.default)[:3] == ["task", "app", "consumer"]


@pytest.mark.parametrize("attribute", ["_request_dict", "_argsrepr", "_kwargsrepr"])
def test_celery_request_keeps_the_reprs_privaterequest_overrides(attribute: str) -> None:
    assert attribute in inspect.getsource(Request.__init__)
    assert issubclass(internals.PrivateRequest, Request)


def test_celery_request_send_event_is_where_events_leave() -> None:
    assert params(Request.send_event)[:2] == ["self", "type"]


@pytest.mark.parametrize(("name", "expected"), [("restore_unacked_once", ["self", "stderr"]),
                                                ("ack", ["self", "delivery_tag"]),
                                                ("restore_by_tag",
                                                 ["self", "tag", "client", "leftmost"])])
def test_kombu_redis_qos_methods(name: str, expected: list[str]) -> None:
    assert params(getattr(kombu_redis.QoS, name)) == expected


def test_kombu_redis_channel_brpop_read_and_its_helpers() -> None:
    assert params(kombu_redis.Channel._brpop_read) == ["self", "options"]
    assert callable(kombu_redis.Channel._flush_brpop_reauth)
    source = inspect.getsource(kombu_redis.Channel._brpop_read)
    for used in ("_queue_cycle", "_in_poll", "connection._deliver", "parse_response"):
        assert used in source, used


@pytest.mark.parametrize("name", ["unacked_key", "unacked_index_key"])
def test_kombu_redis_channel_unacked_keys(name: str) -> None:
    assert isinstance(getattr(kombu_redis.Channel, name), str)


def test_kombu_redis_channel_class_can_be_swapped_and_its_qos_with_it() -> None:
    assert kombu_redis.Transport.Channel in (kombu_redis.Channel, internals.GuardedChannel)
    assert internals.GuardedChannel.QoS is internals.GuardedQoS
