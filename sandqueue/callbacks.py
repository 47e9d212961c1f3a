"""Completion callbacks (webhooks): where they may go, and how they are signed.

Shared by the HTTP API (which refuses a bad `callback_url` at submit) and the worker's
dispatcher (`worker/webhooks.py`, which checks again, on the addresses the name resolves to
at delivery time, and signs what it sends).

The signature header is `Sandqueue-Signature: t=<unix seconds>,v1=<hex>` where the hex is
HMAC-SHA256 over `<t>.<raw body>` with the API key's webhook secret (shown once, by
`sandqueue apikey create`). A receiver recomputes it over the raw body, compares in
constant time, and rejects timestamps more than a few minutes old (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Sandqueue-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


MAX_AGE_S = 300.0
"""How old (or how far ahead, for clock skew) a signature's timestamp may be by default.
The dispatcher signs each attempt afresh, so retries are never older than this."""


def verify(secret: str, header: str, body: bytes, *, max_age_s: float | None = MAX_AGE_S,
           now: float | None = None) -> bool:
    """What a receiver does (Python): recompute and compare in constant time, and refuse a
    timestamp more than `max_age_s` from now (a replayed delivery); None skips that."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    if "t" not in parts or "v1" not in parts or not parts["t"].isdigit():
        return False
    signed_at = int(parts["t"])
    if max_age_s is not None:
        current = time.time() if now is None else now
        if abs(current - signed_at) > max_age_s:
            return False
    return hmac.compare_digest(sign(secret, signed_at, body), header)


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def refusal(url: str, *, allow_private: bool, resolve: bool = True) -> str | None:
    """Why `url` may not receive callbacks, or None. Only http(s); with `resolve`, every
    address the host resolves to must be public unless `allow_private`."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        return f"callback_url is not a valid URL ({e})"
    if parts.scheme not in ("http", "https") or not host:
        return "callback_url must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "callback_url must not carry credentials; the signature authenticates us"
    if allow_private:
        return None
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        if not resolve:
            return None
        try:
            infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
        except OSError as e:
            return f"callback_url host {host!r} does not resolve ({e.strerror or e})"
        addresses = [str(info[4][0]) for info in infos]
    if any(_private(a) for a in addresses):
        return (f"callback_url {host!r} is a loopback, private or link-local address; "
                "callbacks go to public addresses only (SANDQUEUE_WEBHOOK_ALLOW_PRIVATE "
                "lifts this for trusted networks)")
    return None
