"""Sandbox providers: the real E2B one and a simulated one behind one interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

    from sandqueue.settings import Settings
    from worker.sandbox.base import SandboxProvider
    from worker.writebehind import WriteBehind


def make_provider(settings: Settings, redis_client: redis.Redis | None = None,
                  writer: WriteBehind | None = None) -> SandboxProvider:
    """The provider settings ask for. Only the E2B module imports `e2b`."""
    if settings.provider == "e2b":
        from worker.sandbox.e2b import E2BProvider

        return E2BProvider(settings)
    from worker.sandbox.sim import SimProvider

    return SimProvider(settings, redis_client, writer)
