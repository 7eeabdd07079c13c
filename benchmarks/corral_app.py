"""The benchmark tasks as a corral worker app."""

from __future__ import annotations

from benchmarks.tasks import cpu_1ms, echo, noop
from corral.worker import App, Context

app = App("bench")
app.handler(noop)
app.handler(cpu_1ms)
app.handler(echo)


@app.handler
def session_noop(*, ctx: Context) -> None:
    return None
