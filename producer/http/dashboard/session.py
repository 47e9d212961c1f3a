"""Who is looking at the dashboard: the API key in a cookie, and the CSRF token of its forms.

The login form puts the key in an HttpOnly cookie (scripts never see it), SameSite=Strict
(no other site's page can make the browser send it), Secure when served over https. Every
request checks it as the API does (`ApiKeys.authenticate`: unknown, revoked or expired keys
are refused); an admin key sees every tenant, a tenant key its own.

Actions (cancel, retry, logout) are POST forms carrying a token derived from the key
(HMAC-SHA256 of a fixed label under the key): another site can neither read it nor, with
SameSite=Strict, send the cookie; a POST whose Origin is another site is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from producer.apikeys import ApiKeys
from producer.http.auth import Caller

COOKIE = "sq_dash_key"
COOKIE_MAX_AGE_S = 12 * 3600
_CSRF_LABEL = b"sandqueue dashboard csrf v1"


class LoginRequired(Exception):
    """No usable key in the cookie: pages redirect to the login form, streams answer 401."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


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
        return self.admin or scope in self.caller.key.scopes


def csrf_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def viewer(request: Request) -> Viewer:
    """The caller behind the cookie, with the `read` scope; LoginRequired otherwise."""
    presented = request.cookies.get(COOKIE)
    if not presented:
        raise LoginRequired("")
    store: ApiKeys = request.app.state.apikeys
    key, why = store.authenticate(presented)
    if key is None:
        raise LoginRequired(why)
    if "read" not in key.scopes and "admin" not in key.scopes:
        raise LoginRequired("this API key lacks the `read` scope the dashboard needs")
    return Viewer(Caller(key), csrf_token(presented))


def check_form(request: Request, who: Viewer, token: str, scope: str | None = None) -> None:
    """A POST the dashboard's own page sent: same origin, right token, the scope it needs."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.rstrip("/") != _own_origin(request):
        raise Forbidden(f"this form came from another site ({origin[:100]}); use the "
                        "dashboard's own page")
    if not hmac.compare_digest(token.encode(), who.csrf.encode()):
        raise Forbidden("the form's token does not match your session; reload the page and "
                        "try again")
    if scope is not None and not who.may(scope):
        raise Forbidden(f"your API key lacks the `{scope}` scope")


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def set_login(request: Request, response: Response, api_key: str) -> None:
    response.set_cookie(COOKIE, api_key, max_age=COOKIE_MAX_AGE_S, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def clear_login(request: Request, response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
