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


@app.handler
def noisy_then_sleep(text: str, seconds: float) -> None:
    import sys
    import time

    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    time.sleep(seconds)


@app.handler
def cooperative_wait(seconds: float, *, ctx: Context) -> bool:
    import sys

    sys.stderr.write(f"waiting in call {ctx.call_id}\n")
    sys.stderr.flush()
    return ctx.wait_cancelled(seconds)


@app.handler
def pid() -> int:
    import os

    return os.getpid()


_startup_thread: list[str] = []


@threaded.on_startup
def _note_startup_thread() -> None:
    _startup_thread.append(threading.current_thread().name)


@threaded.handler
def startup_thread() -> list[str]:
    return [*_startup_thread, threading.current_thread().name]
