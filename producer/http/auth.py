"""Bearer API keys on every /v1 route: who is calling, for which tenant, with which scopes.

No key, an unknown or wrong key, a revoked or expired one: 401. A key without the scope a
route needs: 403. A task or batch of another tenant is answered 404 by the routes (never
403: its existence is nobody else's business), except for keys with the `admin` scope.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.apikeys import ApiKey, ApiKeys
from producer.http.problems import Problem

_bearer = HTTPBearer(auto_error=False, description="an API key from `sandqueue apikey create`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Caller:
    key: ApiKey

    @property
    def tenant(self) -> str:
        return self.key.tenant

    @property
    def admin(self) -> bool:
        return "admin" in self.key.scopes

    def owns(self, tenant: str | None) -> bool:
        """May this caller see a task or batch recorded with `tenant`?"""
        return self.admin or (bool(tenant) and tenant == self.key.tenant)


def require(scope: str) -> Callable[..., Caller]:
    """A dependency: the calling key, which must hold `scope` (or `admin`)."""

    def dependency(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(401, "auth", "send an API key as `Authorization: Bearer "
                          "sqk_...` (make one with `sandqueue apikey create`)", headers=_CHALLENGE)
        store: ApiKeys = request.app.state.apikeys
        key, why = store.authenticate(credentials.credentials)
        if key is None:
            raise Problem(401, "auth", why, headers=_CHALLENGE)
        if not key.allows(scope):
            raise Problem(403, "forbidden", f"this API key lacks the `{scope}` scope (it has: "
                          f"{', '.join(sorted(key.scopes))})")
        return Caller(key)

    return dependency


def still_valid(request: Request, caller: Caller) -> Callable[[], Awaitable[bool]]:
    """For an open stream (`StreamSlots.hold`): is the caller's key still usable?"""
    store: ApiKeys = request.app.state.apikeys

    async def check() -> bool:
        key = await run_in_threadpool(store.get, caller.key.id)
        return key is not None and key.refusal(time.time()) is None

    return check
