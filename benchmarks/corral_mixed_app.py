"""The benchmark tasks as a corral worker app that also has an async handler.

One async handler is enough to make an app "mixed": the cost tables measure the
sync ``noop`` here against the same handler in the sync-only app
(``benchmarks/corral_app.py``), and ``anoop`` as the async handler's cost.
"""

from __future__ import annotations

from benchmarks.tasks import cpu_1ms, echo, noop
from corral.worker import App

app = App("bench-mixed")
app.handler(noop)
app.handler(cpu_1ms)
app.handler(echo)


@app.handler
async def anoop() -> None:
    return None
