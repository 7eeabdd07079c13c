"""The live status page of a pool: one HTML document and its JSON, as a Starlette app.

Owns: the two routes (``GET /``, the page; ``GET /status.json``, the snapshot),
the page's template (``_status_page.html``, self-contained: no external script,
style or font) and how often the page polls. Must not touch: the pool beyond
``Pool.status()``; which pool to show is decided by the caller
(``corral.asgi.status_app``), through the ``find_pool`` function it passes.

Live updates are by polling: the page fetches ``status.json`` every
``interval`` seconds (decision 0016). No connection stays open, so a server's
graceful shutdown never waits for a status page.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from ._pool import Pool

__all__ = ["build_status_app"]

_NO_STORE = {"Cache-Control": "no-store"}


def _template() -> str:
    return resources.files("corral").joinpath("_status_page.html").read_text(encoding="utf-8")


def build_status_app(find_pool: Callable[[HTTPConnection], Pool], *, interval: float) -> Starlette:
    """The page and its JSON for the pool ``find_pool(request)`` returns.

    ``find_pool`` raises RuntimeError when there is no pool to show; the JSON
    route then answers 503 with the message, and the page shows it.
    """
    template = _template().replace("__INTERVAL__", str(round(interval * 1000)))

    async def page(request: Request) -> HTMLResponse:
        # Under a Mount, root_path is the mount's prefix: the page's JSON is below it.
        base = str(request.scope.get("root_path", "")).rstrip("/")
        return HTMLResponse(
            template.replace("__BASE__", html.escape(base, quote=True)), headers=_NO_STORE
        )

    async def status_json(request: Request) -> JSONResponse:
        try:
            pool = find_pool(request)
        except RuntimeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers=_NO_STORE)
        return JSONResponse(pool.status(rss=True).to_dict(), headers=_NO_STORE)

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"], name="corral_status_page"),
            Route("/status.json", status_json, methods=["GET"], name="corral_status_json"),
        ]
    )
