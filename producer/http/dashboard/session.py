"""Who is looking at the dashboard: a server-side login session, and its forms' CSRF token.

Logging in with an API key starts a session: the browser gets a random session token in an
HttpOnly cookie (scripts never see it), SameSite=Strict (no other site's page can make the
browser send it), Secure when served over https. The API key itself never leaves the login
form's POST: a stolen cookie is not a key to the /v1 API, ends with the session (12 hours, or
logout), and Redis keeps only the token's sha256 with the id of the key it stands for. Every
request re-checks that key (`ApiKeys.get` + `refusal`): revoking or expiring the key ends its
sessions at once. An admin key sees every tenant, a tenant key its own.

Actions (cancel, retry, logout) are POST forms carrying a token derived from the session
token (HMAC-SHA256 of a fixed label under it): another site can neither read it nor, with
SameSite=Strict, send the cookie; a POST whose Origin is another site is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from producer.apikeys import ApiKey, ApiKeys
from producer.http.auth import Caller
from sandqueue import keys
from sandqueue.store import as_text

COOKIE = "sq_dash_session"
COOKIE_MAX_AGE_S = 12 * 3600
_CSRF_LABEL = b"sandqueue dashboard csrf v1"


class LoginRequired(Exception):
    """No usable key in the cookie: pages redirect to the login form, streams answer 401."""

    def __init__(self, why: str, ended: str = "refused") -> None:
        super().__init__(why)
        self.why = why
        self.ended = ended
        """For the login form: `ended` (the session lapsed or was logged out) or `refused`
        (its key no longer may)."""


class Forbidden(Exception):
    """The key lacks a scope, or a form failed its CSRF check: 403 with the reason."""


@dataclass(frozen=True)
class Viewer:
    caller: Caller
    csrf: str

    @property
    def tenant(self) -> str:
        return self.caller.tenant

    @property
    def admin(self) -> bool:
        return self.caller.admin

    def may(self, scope: str) -> bool:
        return self.caller.key.allows(scope)


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def _session_key(token: str) -> str:
    return keys.dashboard_session(hashlib.sha256(token.encode()).hexdigest())


def start_session(store: ApiKeys, key: ApiKey) -> str:
    """A new session for a key that just authenticated; returns the token for the cookie."""
    token = "sqd_" + secrets.token_urlsafe(32)
    pipe = store.r.pipeline()
    pipe.hset(_session_key(token), mapping={"key_id": key.id, "created_at": time.time()})
    pipe.expire(_session_key(token), COOKIE_MAX_AGE_S)
    pipe.execute()
    return token


def end_session(store: ApiKeys, token: str | None) -> None:
    if token:
        store.r.delete(_session_key(token))


def viewer(request: Request) -> Viewer:
    """The caller behind the cookie's session, with the `read` scope; LoginRequired
    otherwise (its `why` says what ended the session, when it did not just lapse)."""
    token = request.cookies.get(COOKIE)
    if not token:
        raise LoginRequired("")
    store: ApiKeys = request.app.state.apikeys
    key_id = as_text(store.r.hget(_session_key(token), "key_id") or b"")
    key = store.get(key_id) if key_id else None
    if key is None:
        raise LoginRequired("your dashboard session has ended; log in again", "ended")
    why = key.refusal(time.time())
    if why:
        raise LoginRequired(why)
    if not key.allows("read"):
        raise LoginRequired("this API key lacks the `read` scope the dashboard needs")
    return Viewer(Caller(key), csrf_token(token))


def session_valid(request: Request) -> Callable[[], Awaitable[bool]]:
    """For an open live stream (`StreamSlots.hold`): does its session still stand?"""

    async def check() -> bool:
        try:
            await run_in_threadpool(viewer, request)
        except LoginRequired:
            return False
        return True

    return check


def check_form(request: Request, who: Viewer, token: str, scope: str | None = None) -> None:
    """A POST the dashboard's own page sent: same origin, right token, the scope it needs."""
    origin = foreign_origin(request)
    if origin:
        raise Forbidden(f"this form came from another site ({origin[:100]}); use the "
                        "dashboard's own page")
    if not hmac.compare_digest(token.encode(), who.csrf.encode()):
        raise Forbidden("the form's token does not match your session; reload the page and "
                        "try again")
    if scope is not None and not who.may(scope):
        raise Forbidden(f"your API key lacks the `{scope}` scope")


def foreign_origin(request: Request) -> str | None:
    """The Origin of a POST that another site's page sent, or None (same origin, or no
    Origin header: older browsers, where the form's token decides)."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.rstrip("/") != _own_origin(request):
        return origin
    return None


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def set_login(request: Request, response: Response, session_token: str) -> None:
    response.set_cookie(COOKIE, session_token, max_age=COOKIE_MAX_AGE_S, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def clear_login(request: Request, response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
