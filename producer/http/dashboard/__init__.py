"""The web dashboard `sandqueue serve` answers at `/`: tasks, one task, batches, the fleet.

Server-rendered pages (Jinja2, `templates/`), two small files of our own for style and
live updates (`static/`: nothing from a CDN, so it works air-gapped), updates over
Server-Sent Events. Same API keys as the /v1 API: logging in with one starts a server-side
session whose token (never the key) is in an HttpOnly cookie (`session.py`); pages and
streams of tasks and batches answer 404 for another tenant's.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from producer.http.dashboard import batch_pages, fleet_page, pages, session
from producer.http.dashboard.render import HERE, SECURITY_HEADERS, page
from producer.http.dashboard.session import Forbidden, LoginRequired
from producer.http.problems import Problem


class _Static(StaticFiles):
    """The vendored CSS and JS, with the pages' security headers."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update({k: v for k, v in SECURITY_HEADERS.items()
                                 if k != "Cache-Control"})
        return response


_PAGES = ("/", "/tasks/", "/batches", "/fleet", "/login", "/logout", "/live/")


def _is_dashboard(request: Request) -> bool:
    path = request.url.path
    return path == "/" or path.startswith(_PAGES[1:])


def install(app: FastAPI) -> None:
    app.include_router(pages.router)
    app.include_router(batch_pages.router)
    app.include_router(fleet_page.router)
    app.mount("/static", _Static(directory=HERE / "static"), name="dashboard-static")
    api_problem = app.exception_handlers[Problem]

    async def login_required(request: Request, e: Exception) -> Response:
        assert isinstance(e, LoginRequired)
        return pages.login_redirect(request, e)

    def who(request: Request) -> session.Viewer | None:
        try:
            return session.viewer(request)  # the page keeps its navigation when logged in
        except LoginRequired:
            return None

    async def forbidden(request: Request, e: Exception) -> Response:
        return page(request, "error.html", status_code=403, status=403, detail=str(e),
                    who=who(request))

    async def problem(request: Request, e: Exception) -> Response:
        # The dashboard's 404 (another tenant's task, or none) is a page; the API's a problem.
        if not _is_dashboard(request):
            return await api_problem(request, e)  # type: ignore[no-any-return]
        assert isinstance(e, Problem)
        return page(request, "error.html", status_code=e.status, status=e.status,
                    detail=e.detail, who=who(request))

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(Problem, problem)
