"""The dashboard's session rules: the cookie's flags, and what a form POST must carry."""

from __future__ import annotations

import pytest
from fastapi.responses import Response
from starlette.requests import Request

from producer.apikeys import ApiKey
from producer.http.auth import Caller
from producer.http.dashboard.session import (
    COOKIE,
    Forbidden,
    Viewer,
    check_form,
    csrf_token,
    set_login,
)


def request(scheme: str = "http", host: str = "dash.example", origin: str | None = None
            ) -> Request:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return Request({"type": "http", "scheme": scheme, "method": "POST", "path": "/x",
                    "headers": headers, "query_string": b"", "server": (host, 443)})


def viewer(key: str = "sqk_a_b", scopes: frozenset[str] = frozenset({"read"})) -> Viewer:
    record = ApiKey(id="a", tenant="acme", scopes=scopes, allow_env=frozenset(), created_at=0)
    return Viewer(Caller(record), csrf_token(key))


@pytest.mark.parametrize(("scheme", "secure"), [("https", True), ("http", False)])
def test_the_login_cookie_is_httponly_strict_and_secure_over_https(scheme: str,
                                                                    secure: bool) -> None:
    response = Response()
    set_login(request(scheme), response, "sqk_a_b")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=sqk_a_b;")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert ("Secure" in cookie) is secure


def test_the_form_token_is_per_key_and_does_not_reveal_it() -> None:
    assert csrf_token("sqk_a_b") == csrf_token("sqk_a_b") != csrf_token("sqk_a_c")
    assert "sqk_a_b" not in csrf_token("sqk_a_b")


def test_a_form_needs_its_token_its_own_origin_and_the_scope() -> None:
    who = viewer()
    check_form(request(origin="http://dash.example"), who, who.csrf)  # same origin: fine
    check_form(request(), who, who.csrf)  # no Origin header (older browsers): the token decides
    with pytest.raises(Forbidden, match="token"):
        check_form(request(), who, "")
    with pytest.raises(Forbidden, match="another site"):
        check_form(request(origin="https://evil.example"), who, who.csrf)
    with pytest.raises(Forbidden, match="`cancel` scope"):
        check_form(request(), who, who.csrf, "cancel")
    admin = viewer(scopes=frozenset({"admin"}))
    check_form(request(), admin, admin.csrf, "cancel")
