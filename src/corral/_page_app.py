"""What the status page and the routing page share: a self-contained page, its JSON, polling.

Owns: ``build_page_app``, the Starlette app of two routes (``GET /``, the page;
``GET /<name>.json``, a snapshot), the page's template loading (the HTML file
plus the shared style sheet ``_page_style.css``, spliced in at
``__SHARED_STYLE__``), the polling interval and the mount prefix written into
the page (``__INTERVAL__``, ``__BASE__``), and the 503 answer when there is
nothing to show. Must not touch: what a snapshot holds; the status page
(``_status_page``) and the routing page (``_routing_page``) say that, and
which pool or front to show is decided by ``corral.asgi``.

Live updates are by polling: the page fetches its JSON every ``interval``
seconds (decision 0016). No connection stays open, so a server's graceful
shutdown never waits for a page.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

__all__ = ["build_page_app"]

_NO_STORE = {"Cache-Control": "no-store"}


def _read(name: str) -> str:
    return resources.files("corral").joinpath(name).read_text(encoding="utf-8")


def build_page_app(
    template: str,
    *,
    json_path: str,
    route_names: tuple[str, str],
    snapshot: Callable[[HTTPConnection], Any],
    interval: float,
) -> Starlette:
    """``GET /`` serves the packaged ``template``; ``GET json_path`` serves ``snapshot(request)``.

    ``snapshot`` raises RuntimeError when there is nothing to show: the JSON
    route then answers 503 with the message, and the page shows it.
    ``route_names`` names the two routes (page, JSON) for ``url_path_for``.
    """
    page_html = (
        _read(template)
        .replace("__SHARED_STYLE__", _read("_page_style.css").rstrip("\n"))
        .replace("__INTERVAL__", str(round(interval * 1000)))
    )

    async def page(request: Request) -> HTMLResponse:
        # Under a Mount, root_path is the mount's prefix: the page's JSON is below it.
        base = str(request.scope.get("root_path", "")).rstrip("/")
        return HTMLResponse(
            page_html.replace("__BASE__", html.escape(base, quote=True)), headers=_NO_STORE
        )

    async def as_json(request: Request) -> JSONResponse:
        try:
            found = snapshot(request)
        except RuntimeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers=_NO_STORE)
        return JSONResponse(found, headers=_NO_STORE)

    page_name, json_name = route_names
    return Starlette(
        routes=[
            Route("/", page, methods=["GET"], name=page_name),
            Route(json_path, as_json, methods=["GET"], name=json_name),
        ]
    )
