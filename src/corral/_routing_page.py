"""The live routing page of a Pools front: one HTML document and its JSON, as a Starlette app.

Owns: what the page shows (``_routing_page.html``, self-contained like the
pool's status page; the charts are inline SVG drawn by the page's own script)
and its JSON (``GET /routing.json``: ``Pools.status()``). Must not touch: the
front beyond ``Pools.status()``; which front to show is decided by the caller
(``corral.asgi.routing_status_app``) through the ``find_front`` function it
passes. The routes, the polling and the shared style are ``_page_app``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from ._page_app import build_page_app
from ._pools import Pools

__all__ = ["build_routing_app"]


def build_routing_app(
    find_front: Callable[[HTTPConnection], Pools], *, interval: float
) -> Starlette:
    """The page and its JSON for the front ``find_front(request)`` returns.

    ``find_front`` raises RuntimeError when there is no front to show; the JSON
    route then answers 503 with the message, and the page shows it.
    """

    def snapshot(request: HTTPConnection) -> dict[str, Any]:
        return find_front(request).status()

    return build_page_app(
        "_routing_page.html",
        json_path="/routing.json",
        route_names=("corral_routing_page", "corral_routing_json"),
        snapshot=snapshot,
        interval=interval,
    )
