"""The dashboard's session rules: the cookie's flags, server-side sessions, and what a form
POST must carry."""

from __future__ import annotations

from types import SimpleNamespace

import fakeredis
import pytest
from fastapi.responses import Response
from starlette.requests import Request

from producer.apikeys import ApiKey, ApiKeys
from producer.http.auth import Caller
from producer.http.dashboard.session import (
    COOKIE,
    Forbidden,
    LoginRequired,
    Viewer,
    check_form,
    csrf_token,
    end_session,
    set_login,
    start_session,
)
from producer.http.dashboard.session import viewer as signed_in
from sandqueue.errors import ConfigError


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
    set_login(request(scheme), response, "sqd_token")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=sqd_token;")
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


def cookie_request(store: ApiKeys, token: str | None) -> Request:
    headers = [(b"cookie", f"{COOKIE}={token}".encode())] if token else []
    return Request({"type": "http", "scheme": "http", "method": "GET", "path": "/",
                    "headers": headers, "query_string": b"", "server": ("dash", 80),
                    "app": SimpleNamespace(state=SimpleNamespace(apikeys=store))})


@pytest.fixture
def store() -> ApiKeys:
    return ApiKeys(fakeredis.FakeRedis())


def test_a_session_stands_for_its_key_and_redis_keeps_neither_token_nor_key(
        store: ApiKeys) -> None:
    record, secret, _ = store.create("acme")
    token = start_session(store, record)
    assert token.startswith("sqd_") and secret not in token
    who = signed_in(cookie_request(store, token))
    assert (who.tenant, who.csrf) == ("acme", csrf_token(token))
    dump = b" ".join(k + b" " + b" ".join(v for kv in store.r.hgetall(k).items() for v in kv)
                     for k in store.r.keys("*") if store.r.type(k) == b"hash")
    assert token.encode() not in dump and secret.encode() not in dump
    assert 0 < store.r.ttl(next(iter(store.r.keys("*dash:session:*")))) <= 12 * 3600


def test_revoking_the_key_or_logging_out_ends_its_sessions(store: ApiKeys) -> None:
    record, _, _ = store.create("acme")
    kept, revoked_later = start_session(store, record), start_session(store, record)
    other, _, _ = store.create("globex")
    ended = start_session(store, other)
    end_session(store, ended)
    with pytest.raises(LoginRequired, match="session has ended"):
        signed_in(cookie_request(store, ended))
    assert signed_in(cookie_request(store, kept)).tenant == "acme"
    store.revoke(record.id)
    for token in (kept, revoked_later):
        with pytest.raises(LoginRequired, match="revoked"):
            signed_in(cookie_request(store, token))


@pytest.mark.parametrize("token", [None, "sqd_made_up", "sqk_an_api_key"])
def test_a_cookie_that_is_no_session_asks_for_a_login(store: ApiKeys, token: str | None
                                                      ) -> None:
    _, secret, _ = store.create("acme")
    presented = secret if token == "sqk_an_api_key" else token  # the raw key is no session
    with pytest.raises(LoginRequired):
        signed_in(cookie_request(store, presented))


@pytest.mark.parametrize("days", [float("nan"), float("inf"), 0, -1, 40000])
def test_a_key_cannot_be_made_to_expire_never_by_a_number_that_is_not_one(
        store: ApiKeys, days: float) -> None:
    # nan and inf pass a range check written with < and >: the key would never expire
    with pytest.raises(ConfigError, match="number of days"):
        store.create("acme", expires_days=days)
    assert store.list() == []
