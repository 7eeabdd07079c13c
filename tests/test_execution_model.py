"""Where a worker runs sync handlers: one thread for all of them, per app."""

from __future__ import annotations

import asyncio
import time

import pytest

import corral
from corral import Pool


async def test_an_app_without_async_handlers_runs_sync_code_on_the_main_thread() -> None:
    async with Pool("tests.workers.sync_only:app", size=1) as pool:
        assert await pool.call("thread_name") == "MainThread"
        assert [w async for w in pool.stream("words", 2)] == ["MainThread0", "MainThread1"]


async def test_an_app_with_async_handlers_runs_sync_code_on_the_main_thread_too() -> None:
    async with Pool("tests.workers.basic:app", size=1) as pool:
        names = {await pool.call("thread_name") for _ in range(5)}
        async_names = {await pool.call("async_thread_name") for _ in range(3)}
    assert names == {"MainThread"}
    # Once suspended, async code runs on the loop's own thread (before it
    # suspends, possibly on the main thread: tests/test_async_first_step.py).
    assert len(async_names) == 1 and async_names != {"MainThread"}


async def test_an_async_handler_keeps_running_while_a_sync_handler_blocks() -> None:
    # The async call waits for a flag that only a later sync call sets, and the
    # sync call then blocks until the async call has finished: both must run at once.
    async with Pool("tests.workers.basic:app", size=1, max_concurrency=2) as pool:
        items = pool.stream("async_wait_for_flag", 10.0)
        assert await anext(items) == "started"
        assert await pool.call("set_flag_and_wait_for_async", 10.0) is True
        assert await anext(items) is True


async def test_sync_mode_thread_can_be_chosen() -> None:
    async with Pool("tests.workers.sync_only:threaded", size=1) as pool:
        assert await pool.call("thread_name") != "MainThread"


@pytest.mark.parametrize("target", ["tests.workers.sync_only:app", "tests.workers.basic:app"])
async def test_a_sync_handler_may_run_an_event_loop_of_its_own(target: str) -> None:
    async with Pool(target, size=1) as pool:
        assert await pool.call("nested_asyncio_run", 21) == 42
        assert await pool.call("nested_asyncio_run", 1) == 2


async def test_an_inline_handler_sees_its_deadline_pass() -> None:
    async with Pool("tests.workers.sync_only:app", size=1, cancel_grace=5.0) as pool:
        started = time.monotonic()
        with pytest.raises(corral.CallTimeout):
            await pool.call("wait_for_deadline", 30, timeout=0.2)
        await pool.wait_idle(timeout=5)
        assert time.monotonic() - started < 2.0  # stopped at its deadline, not after 30 s
        assert pool.stats().restarts == 0


def test_an_unknown_sync_mode_is_refused() -> None:
    from corral.worker import App

    with pytest.raises(ValueError, match="sync_mode"):
        App(sync_mode="sometimes")


async def test_an_inline_handler_still_answers_heartbeats() -> None:
    async with Pool(
        "tests.workers.sync_only:app", size=1, heartbeat_interval=0.05, heartbeat_timeout=0.4
    ) as pool:
        pid = await pool.call("pid")
        await pool.call("noisy_then_sleep", "inline sleep", 1.2)
        assert await pool.call("pid") == pid and pool.stats().restarts == 0


async def test_a_cancel_reaches_an_inline_handler_while_it_runs() -> None:
    async with Pool("tests.workers.sync_only:app", size=1) as pool:
        pid = await pool.call("pid")
        task = asyncio.ensure_future(pool.call("cooperative_wait", 60))
        assert await pool._wait_until(lambda: "waiting in call" in pool.workers[0].stderr_tail, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.wait_idle(timeout=5)  # acknowledged: the handler saw ctx.cancelled
        assert await pool.call("pid") == pid and pool.stats().restarts == 0


async def test_sync_hooks_run_on_the_thread_of_the_sync_handlers() -> None:
    async with Pool("tests.workers.sync_only:threaded", size=1) as pool:
        startup, handler = await pool.call("startup_thread")
    assert startup == handler != "MainThread"


async def test_a_sync_stream_longer_than_its_window_resumes_on_credit() -> None:
    # A stream out of credit is parked by the main thread and stepped again
    # when Credit comes; every item is made on the main thread.
    async with Pool("tests.workers.sync_only:app", size=1, stream_window=4) as pool:
        items = [w async for w in pool.stream("words", 50)]
        assert items == [f"MainThread{i}" for i in range(50)]
        assert await pool.call("thread_name") == "MainThread"


async def test_a_parked_sync_stream_past_its_deadline_ends_and_the_worker_serves_on() -> None:
    async with Pool("tests.workers.sync_only:app", size=1, stream_window=1) as pool:
        pid = await pool.call("pid")
        stream = pool.stream("words", 1000, timeout=0.5)
        assert await anext(stream) == "MainThread0"
        # No more reading: the worker runs out of credit and parks the stream,
        # which ends at its deadline (the worker's or the caller's, first).
        await pool.wait_idle(timeout=10)
        with pytest.raises(corral.CallTimeout):
            while True:
                await anext(stream)
        assert await pool.call("pid") == pid and pool.stats().restarts == 0
