"""A sync-only app that imports nothing: what its worker loads is the worker's own doing."""

from __future__ import annotations

import sys

from corral.worker import App

app = App()


@app.handler
def loaded_modules() -> list[str]:
    return sorted(sys.modules)
