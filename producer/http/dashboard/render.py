"""Pages from Jinja2 templates, with autoescaping on and the security headers every page needs.

Everything a user controls (prompts, labels, results, error messages, tenant names) reaches a
page through `{{ }}` only, which autoescapes: no template marks any value `|safe`. The
Content-Security-Policy allows scripts, styles and connections from this origin only and no
inline script or style at all, so even a value that slipped through could not run.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def ago(stamp: float | str | None, now: float | None = None) -> str:
    """`12s ago`, `3m ago`, `2h ago`: how long since an epoch time."""
    if stamp in (None, ""):
        return "—"
    return duration(max(0.0, (now or time.time()) - float(stamp or 0))) + " ago"


def duration(seconds: float | str | None) -> str:
    if seconds in (None, ""):
        return "—"
    s = float(seconds or 0)
    if s < 10:
        return f"{s:.2f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"


def clock(stamp: float | str | None) -> str:
    if stamp in (None, ""):
        return "—"
    return datetime.fromtimestamp(float(stamp or 0), UTC).strftime("%Y-%m-%d %H:%M:%S")


def usd(value: float | str | None) -> str:
    if value in (None, ""):
        return "—"
    v = float(value or 0)
    return f"${v:.4f}" if v < 1 else f"${v:,.2f}"


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(ago=ago, duration=duration, clock=clock, usd=usd)
    return env


ENV = _env()


def page(request: Request, template: str, status_code: int = 200, **context: Any
         ) -> HTMLResponse:
    body = ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
