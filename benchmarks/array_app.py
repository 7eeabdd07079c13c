"""The array benchmark tasks as a corral worker app."""

from __future__ import annotations

from benchmarks.array_tasks import echo, noop
from corral.worker import App

app = App("bench-arrays", sync_mode="inline")
app.handler(noop)
app.handler(echo)
