"""An app with no async handlers: its sync handlers run inline on the main thread."""

from __future__ import annotations

import threading

from corral.worker import App, Context

from . import basic

app = App()
threaded = App(sync_mode="thread")


# The same functions as the mixed app's, registered here without async neighbours.
for shared in (basic.thread_name, basic.nested_asyncio_run):
    app.handler(shared)
    threaded.handler(shared)
app.handler(basic.noisy_then_sleep)
app.handler(basic.pid)


@app.handler
def wait_for_deadline(seconds: float, *, ctx: Context) -> bool:
    return ctx.wait_cancelled(seconds)


@app.handler
def words(n: int):
    for i in range(n):
        yield threading.current_thread().name + str(i)


@app.handler
def cooperative_wait(seconds: float, *, ctx: Context) -> bool:
    import sys

    sys.stderr.write(f"waiting in call {ctx.call_id}\n")
    sys.stderr.flush()
    return ctx.wait_cancelled(seconds)


_startup_thread: list[str] = []


@threaded.on_startup
def _note_startup_thread() -> None:
    _startup_thread.append(threading.current_thread().name)


@threaded.handler
def startup_thread() -> list[str]:
    return [*_startup_thread, threading.current_thread().name]
