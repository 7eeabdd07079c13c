"""The live routing page of a Pools front: one HTML document and its JSON, as a Starlette app.

Owns: the two routes (``GET /``, the page; ``GET /routing.json``, the snapshot
``Pools.status()`` returns) and the page's template (``_routing_page.html``,
self-contained like the pool's status page: no external script, style or font;
the charts are inline SVG drawn by the page's own script). Must not touch: the
front beyond ``Pools.status()``; which front to show is decided by the caller
(``corral.asgi.routing_status_app``) through the ``find_front`` function it passes.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from ._pools import Pools

__all__ = ["build_routing_app"]

_NO_STORE = {"Cache-Control": "no-store"}


def _template() -> str:
    return resources.files("corral").joinpath("_routing_page.html").read_text(encoding="utf-8")


def build_routing_app(
    find_front: Callable[[HTTPConnection], Pools], *, interval: float
) -> Starlette:
    """The page and its JSON for the front ``find_front(request)`` returns.

    ``find_front`` raises RuntimeError when there is no front to show; the JSON
    route then answers 503 with the message, and the page shows it.
    """
    template = _template().replace("__INTERVAL__", str(round(interval * 1000)))

    async def page(request: Request) -> HTMLResponse:
        base = str(request.scope.get("root_path", "")).rstrip("/")
        return HTMLResponse(
            template.replace("__BASE__", html.escape(base, quote=True)), headers=_NO_STORE
        )

    async def routing_json(request: Request) -> JSONResponse:
        try:
            front = find_front(request)
        except RuntimeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers=_NO_STORE)
        return JSONResponse(front.status(), headers=_NO_STORE)

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"], name="corral_routing_page"),
            Route("/routing.json", routing_json, methods=["GET"], name="corral_routing_json"),
        ]
    )
