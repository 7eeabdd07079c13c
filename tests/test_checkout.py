"""checkout(): exclusive leases, session routing, and exact accounting on every exit path."""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


async def test_a_leased_worker_takes_no_other_call() -> None:
    async with Pool(TARGET, size=1) as pool:
        async with pool.checkout() as worker:
            plain = asyncio.ensure_future(pool.call("add", 1, 1))
            await asyncio.sleep(0)
            assert pool.stats().waiting == 1 and not plain.done()
            assert await worker.call("add", 2, 2) == 4
        assert await plain == 2
        assert pool.stats().leased == 0


async def test_checkout_with_a_session_waits_for_the_worker_holding_it() -> None:
    async with Pool(TARGET, size=2) as pool:
        home = (await pool.call("whoami", session="s"))["pid"]
        for _ in range(3):
            async with pool.checkout(session="s") as worker:
                assert worker.pid == home


async def test_an_exception_in_the_block_with_nothing_in_flight_keeps_the_worker() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(KeyError):
            async with pool.checkout() as worker:
                pid = worker.pid
                raise KeyError("application bug")
        assert await pool.call("pid") == pid
        assert pool.stats().restarts == 0


async def test_a_remote_error_in_the_block_keeps_the_worker() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(corral.RemoteError):
            async with pool.checkout() as worker:
                pid = worker.pid
                await worker.call("fail", "x")
        assert await pool.call("pid") == pid


async def test_a_crash_in_the_block_evicts_the_worker() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(corral.WorkerCrashed):
            async with pool.checkout() as worker:
                pid = worker.pid
                await worker.call("exit_now", 1)
        await pool.wait_ready(timeout=10)
        assert await pool.call("pid") != pid


async def test_interrupted_block_cancels_the_call_and_keeps_a_worker_that_acknowledges() -> None:
    async with Pool(TARGET, size=1) as pool:
        entered = asyncio.Event()

        async def hold() -> None:
            async with pool.checkout() as worker:
                entered.set()
                await worker.call("cooperative_wait", 60)

        task = asyncio.ensure_future(hold())
        await entered.wait()
        pid = pool.workers[0].pid
        await asyncio.sleep(0)  # the call is on the wire
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.stats().leased == 0
        assert await pool.call("pid") == pid  # acknowledged: same worker
        assert pool.stats().restarts == 0


async def test_interrupted_block_evicts_a_worker_that_does_not_acknowledge() -> None:
    async with Pool(TARGET, size=1, cancel_grace=0.2) as pool:
        entered = asyncio.Event()

        async def hold() -> None:
            async with pool.checkout() as worker:
                entered.set()
                await worker.call("noisy_then_sleep", "holding on", 60)

        task = asyncio.ensure_future(hold())
        await entered.wait()
        pid = pool.workers[0].pid
        assert await pool._wait_until(lambda: "holding on" in pool.workers[0].stderr_tail, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await pool.call("pid") != pid
        assert pool.stats().restarts == 1


async def test_cancelled_while_waiting_for_a_checkout_leaks_nothing() -> None:
    async with Pool(TARGET, size=1) as pool:
        async with pool.checkout():
            waiting = asyncio.ensure_future(pool.checkout().__aenter__())
            await asyncio.sleep(0)
            assert pool.stats().waiting == 1
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert pool.stats().waiting == 0
        stats = pool.stats()
        assert stats.leased == 0 and stats.inflight == 0 and stats.idle == 1


async def test_a_checkout_is_not_starved_by_a_stream_of_plain_calls() -> None:
    async with Pool(TARGET, size=2, max_concurrency=4) as pool:
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await pool.call("async_sleep", 0.01)

        floods = [asyncio.ensure_future(flood()) for _ in range(16)]
        try:
            async with pool.checkout(timeout=5.0) as worker:
                assert await worker.call("add", 1, 1) == 2
        finally:
            stop.set()
            await asyncio.gather(*floods)


async def test_a_released_lease_refuses_calls() -> None:
    async with Pool(TARGET, size=1) as pool:
        async with pool.checkout() as worker:
            pass
        with pytest.raises(corral.PoolClosed, match="checkout"):
            await worker.call("add", 1, 1)


async def test_streams_inside_a_checkout() -> None:
    async with Pool(TARGET, size=1) as pool, pool.checkout() as worker:
        assert [x async for x in worker.stream("count", 3)] == [0, 1, 2]
