"""A sync-only app that imports nothing: what its worker loads is the worker's own doing.

Its handlers import what they use inside their bodies, so that an idle worker of
this app shows only what the worker itself imported at start.
"""

from __future__ import annotations

import sys
from typing import Any

from corral.worker import App, Context

app = App()


@app.handler
def loaded_modules() -> list[str]:
    return sorted(sys.modules)


@app.handler
def typed_dict_with_typing_extensions(raw: bytes) -> dict[str, Any]:
    """Decode ``raw`` (JSON) as a TypedDict built with typing_extensions' names."""
    import msgspec
    import typing_extensions

    # the functional form: its annotations are objects here, not strings to resolve
    Point = typing_extensions.TypedDict(  # noqa: UP013
        "Point", {"x": int, "label": typing_extensions.NotRequired[str]}
    )

    point = msgspec.json.decode(raw, type=Point)
    hints = typing_extensions.get_type_hints(Point, include_extras=True)
    return {"point": dict(point), "hints": sorted(hints)}


@app.handler
def with_context(*, ctx: Context) -> str:
    return ctx.worker_id


@app.handler
def fails() -> None:
    raise ValueError("on purpose")
