"""Cancelling a caller stops the work in the worker; slots come back exactly once."""

from __future__ import annotations

import asyncio
import time

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


async def _cancel_after_sent(pool: Pool, method: str, *args: object) -> None:
    inflight = pool.stats().inflight
    task = asyncio.ensure_future(pool.call(method, *args))
    await asyncio.sleep(0)  # sent
    assert pool.stats().inflight == inflight + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _cancel_once_running(pool: Pool, seconds: float, marker: str) -> None:
    """Cancel a sync handler that is already running (it says so on stderr)."""
    task = asyncio.ensure_future(pool.call("noisy_then_sleep", marker, seconds))
    assert await pool._wait_until(lambda: any(marker in w.stderr_tail for w in pool.workers), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("method", ["async_sleep", "cooperative_wait"])
async def test_a_cancelled_call_is_stopped_and_the_worker_kept(method: str) -> None:
    async with Pool(TARGET, size=1) as pool:
        pid = await pool.call("pid")
        await _cancel_after_sent(pool, method, 60)
        assert await pool._wait_until(lambda: pool.stats().inflight == 0, 5)
        assert await pool.call("pid") == pid
        assert pool.stats().restarts == 0


async def test_a_cancelled_call_that_ignores_it_costs_the_worker() -> None:
    async with Pool(TARGET, size=1, cancel_grace=0.2) as pool:
        pid = await pool.call("pid")
        await _cancel_once_running(pool, 60, "running-forever")
        assert await pool.call("pid") != pid


async def test_a_worker_with_an_unacknowledged_cancel_gets_no_new_calls() -> None:
    async with Pool(TARGET, size=2, cancel_grace=5.0) as pool:
        async with pool.checkout() as worker:
            stuck = worker.pid
            call = asyncio.ensure_future(worker.call("noisy_then_sleep", "half-second", 0.5))
            assert await pool._wait_until(
                lambda: any("half-second" in w.stderr_tail for w in pool.workers), 5
            )
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        pids = {await pool.call("pid") for _ in range(10)}
        assert stuck not in pids  # it finishes its sleep, acks, and is back afterwards
        assert await pool._wait_until(lambda: pool.stats().inflight == 0, 5)
        assert pool.stats().restarts == 0


async def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    async with Pool(TARGET, size=1) as pool:
        first = asyncio.ensure_future(pool.call("noisy_then_sleep", "first-running", 0.5))
        assert await pool._wait_until(lambda: "first-running" in pool.workers[0].stderr_tail, 5)
        # The worker is busy with `first`: this call waits in the worker's queue.
        await _cancel_after_sent(pool, "noisy_then_sleep", "must-not-run", 0)
        assert await first is None
        await pool.wait_idle(timeout=5)
        await pool.call("add", 1, 1)
        assert "must-not-run" not in pool.workers[0].stderr_tail


async def test_a_late_reply_never_reaches_another_caller() -> None:
    async with Pool(TARGET, size=1, max_concurrency=4) as pool:
        with pytest.raises(corral.CallTimeout):
            await pool.call("async_echo_after", "late", 0.3, timeout=0.05)
        results = await asyncio.gather(*(pool.call("echo", i) for i in range(50)))
        assert results == list(range(50))


async def test_timeout_covers_the_wait_for_a_worker() -> None:
    async with Pool(TARGET, size=1) as pool, pool.checkout():
        with pytest.raises(corral.CallTimeout, match="waiting for a worker"):
            await pool.call("add", 1, 1, timeout=0.1)
        assert pool.stats().waiting == 0


async def test_the_worker_sees_the_deadline_and_cancelled_flag() -> None:
    async with Pool(TARGET, size=1) as pool:
        # The worker's own timer fires too: the handler is told to stop.
        with pytest.raises(corral.CallTimeout):
            await pool.call("cooperative_wait", 30, timeout=0.2)
        assert await pool._wait_until(lambda: pool.stats().inflight == 0, 5)
        assert pool.stats().restarts == 0


async def test_breaking_out_of_a_stream_stops_the_generator() -> None:
    async with Pool(TARGET, size=1) as pool:
        async for item in pool.stream("count_forever"):
            if item == 3:
                break
        assert await pool._wait_until(lambda: pool.stats().inflight == 0, 5)
        assert pool.stats().restarts == 0
        assert await pool.call("add", 1, 1) == 2


async def test_a_stream_is_flow_controlled() -> None:
    async with Pool(TARGET, size=1, stream_window=4) as pool:
        stream = pool.stream("count_and_report", 100)
        assert await stream.__anext__() == 0
        # The consumer paused after one item: the producer runs at most a window ahead.
        for _ in range(20):
            await pool.call("produced")  # round trips give the producer every chance
        assert await pool.call("produced") <= 4 + 1
        items = [0] + [x async for x in stream]
        assert items == list(range(100))
        assert await pool.call("produced") == 100


async def test_closing_a_sync_stream_that_is_out_of_credit_keeps_the_worker() -> None:
    async with Pool(TARGET, size=1, stream_window=1, cancel_grace=2.0) as pool:
        pid = await pool.call("pid")
        stream = pool.stream("slow_words", 50, 0.2)
        assert await stream.__anext__() == "word0"
        await stream.aclose()
        await pool.wait_idle(timeout=5)
        assert await pool.call("pid") == pid
        assert pool.stats().restarts == 0


async def test_a_reply_read_after_the_deadline_is_a_timeout_whatever_runs_first() -> None:
    # The reply is produced at once, but this loop is blocked past the deadline:
    # when it runs again the reply is read before the deadline timer's callback.
    async with Pool(TARGET, size=1) as pool:
        call = asyncio.ensure_future(pool.call("echo", 1, timeout=0.1))
        await asyncio.sleep(0)  # the call is sent
        time.sleep(0.3)  # noqa: ASYNC251 - blocking this loop is the point
        with pytest.raises(corral.CallTimeout):
            await call
        assert await pool.call("echo", 2, timeout=5) == 2  # the worker is fine
