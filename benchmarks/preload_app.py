"""A worker app whose module imports a slow module, for ``benchmarks/preload.py``."""

from __future__ import annotations

import os

from benchmarks import heavy_module  # noqa: F401 - the import is the cost being measured
from corral.worker import App

app = App("preload-bench")


@app.handler
def noop() -> None:
    return None


@app.handler
def crash() -> None:
    os._exit(1)
