"""Async handlers that stop in their first step, suspend after it, or fail in it.

Used by tests/test_async_first_step.py: an async handler's first step may run
on the worker's main thread (decision 0028); what it does after a real
suspension runs on the loop thread, and either way it must behave as an
asyncio task of the worker's loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator

from corral.worker import App

app = App("async-steps")

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")
_cancelled = threading.Event()
_suspended = threading.Event()
_background_ran = threading.Event()
_timer_fired = threading.Event()


def _where() -> dict[str, object]:
    return {
        "thread": threading.current_thread().name,
        "loop": id(asyncio.get_running_loop()),
        "task": id(asyncio.current_task()),
    }


@app.handler
async def no_await() -> dict[str, object]:
    return _where()


@app.handler
async def across_a_real_await(seconds: float) -> list[dict[str, object]]:
    first = _where()
    await asyncio.sleep(seconds)
    return [first, _where()]


@app.handler
async def across_a_bare_yield() -> list[dict[str, object]]:
    first = _where()
    await asyncio.sleep(0)
    return [first, _where()]


@app.handler
async def awaits_a_future_set_by_the_loop() -> str:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    loop.call_soon(future.set_result, "set by the loop")
    return await future


@app.handler
async def fails_at_once(message: str) -> None:
    raise ValueError(message)


@app.handler
async def fails_after_an_await(message: str) -> None:
    await asyncio.sleep(0.001)
    raise KeyError(message)


@app.handler
async def suspends_until_cancelled() -> None:
    _cancelled.clear()
    _suspended.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _cancelled.set()
        raise


@app.handler
def wait_until_suspended(seconds: float) -> bool:
    return _suspended.wait(seconds)


@app.handler
def saw_the_cancel(seconds: float) -> bool:
    return _cancelled.wait(seconds)


@app.handler
async def var_across_an_await(value: str) -> list[str]:
    VAR.set(value)
    await asyncio.sleep(0.001)
    return [VAR.get(), threading.current_thread().name]


@app.handler
def set_var_in_sync_handler(value: str) -> str:
    VAR.set(value)
    return VAR.get()


@app.handler
async def read_var() -> str:
    return VAR.get()


@app.handler
async def spawns_and_returns() -> None:
    async def background() -> None:
        _background_ran.set()

    _background_ran.clear()
    asyncio.get_running_loop().create_task(background())


@app.handler
def background_ran(seconds: float) -> bool:
    return _background_ran.wait(seconds)


@app.handler
async def schedules_a_timer_and_returns(delay: float) -> None:
    _timer_fired.clear()
    asyncio.get_running_loop().call_later(delay, _timer_fired.set)


@app.handler
def timer_fired(seconds: float) -> bool:
    return _timer_fired.wait(seconds)


@app.handler
async def blocks_in_its_first_step(seconds: float) -> str:
    time.sleep(seconds)  # noqa: ASYNC251 - a handler that blocks is what is tested
    return "late"


@app.handler
async def sleeps(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@app.handler
async def counts(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i
        if i % 2:
            await asyncio.sleep(0)


@app.handler
def sync_thread() -> str:
    return threading.current_thread().name
