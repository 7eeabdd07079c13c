"""An app with no async handlers: its sync handlers run inline on the main thread."""

from __future__ import annotations

import asyncio
import threading

from corral.worker import App, Context

app = App()
threaded = App(sync_mode="thread")


@app.handler
@threaded.handler
def thread_name() -> str:
    return threading.current_thread().name


@app.handler
@threaded.handler
def nested_asyncio_run(value: int) -> int:
    async def double() -> int:
        await asyncio.sleep(0)
        return value * 2

    return asyncio.run(double())


@app.handler
def wait_for_deadline(seconds: float, *, ctx: Context) -> bool:
    return ctx.wait_cancelled(seconds)


@app.handler
def words(n: int):
    for i in range(n):
        yield threading.current_thread().name + str(i)
