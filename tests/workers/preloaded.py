"""The basic test app plus one handler that says which process imported the slow module.

Used with ``Pool(..., preload=["tests.workers.slow_import"])``: a worker forked
from the template sees the template's import, not one of its own.
"""

from __future__ import annotations

from tests.workers import slow_import
from tests.workers.basic import app

__all__ = ["app"]


@app.handler
def imported_by() -> int:
    return slow_import.IMPORTED_BY
