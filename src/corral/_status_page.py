"""The live status page of a pool: one HTML document and its JSON, as a Starlette app.

Owns: what the page shows (``_status_page.html``, self-contained: no external
script, style or font) and its JSON (``GET /status.json``: ``Pool.status()``
with memory). Must not touch: the pool beyond ``Pool.status()``; which pool to
show is decided by the caller (``corral.asgi.status_app``), through the
``find_pool`` function it passes. The routes, the polling and the shared style
are ``_page_app``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from ._page_app import build_page_app
from ._pool import Pool

__all__ = ["build_status_app"]


def build_status_app(find_pool: Callable[[HTTPConnection], Pool], *, interval: float) -> Starlette:
    """The page and its JSON for the pool ``find_pool(request)`` returns.

    ``find_pool`` raises RuntimeError when there is no pool to show; the JSON
    route then answers 503 with the message, and the page shows it.
    """

    def snapshot(request: HTTPConnection) -> dict[str, Any]:
        return find_pool(request).status(rss=True).to_dict()

    return build_page_app(
        "_status_page.html",
        json_path="/status.json",
        route_names=("corral_status_page", "corral_status_json"),
        snapshot=snapshot,
        interval=interval,
    )
