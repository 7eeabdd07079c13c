"""queue_timeout: a plain call or stream that waits too long for a worker is refused
with PoolTimeout, before anything ran, so a caller (or the Pools front) can go elsewhere."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from corral import CallTimeout, Pool, Pools, PoolTimeout, Workload

TARGET = "tests.workers.basic:app"


def busy_pool(**options: object) -> Pool:
    # One worker that takes one call at a time: a second call must queue.
    return Pool(TARGET, size=1, max_concurrency=1, **options)  # type: ignore[arg-type]


async def occupy(pool: Pool, seconds: float) -> asyncio.Task[object]:
    task = asyncio.create_task(pool.call("async_sleep", seconds))
    await asyncio.sleep(0)  # its first step claims the only slot
    assert pool.stats().busy == 1
    return task


async def test_a_call_that_waits_past_queue_timeout_is_a_pool_timeout() -> None:
    async with busy_pool(queue_timeout=0.2) as pool:
        busy = await occupy(pool, 2.0)
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match="queue_timeout") as info:
            await pool.call("add", 1, 2, timeout=30)
        assert time.monotonic() - started < 1.5  # refused long before the busy call ends
        assert info.value.method == "add"
        await busy
        assert await pool.call("add", 1, 2) == 3  # nothing was left queued
        assert pool.stats().restarts == 0


async def test_a_stream_that_waits_past_queue_timeout_is_a_pool_timeout() -> None:
    async with busy_pool(queue_timeout=0.2) as pool:
        busy = await occupy(pool, 2.0)
        with pytest.raises(PoolTimeout):
            async for _ in pool.stream("count", 3, timeout=30):
                pass
        await busy


async def test_the_call_deadline_still_wins_when_it_comes_first() -> None:
    async with busy_pool(queue_timeout=5.0) as pool:
        busy = await occupy(pool, 2.0)
        with pytest.raises(CallTimeout):
            await pool.call("add", 1, 2, timeout=0.2)
        await busy


async def test_without_queue_timeout_a_call_waits_for_its_worker() -> None:
    async with busy_pool() as pool:
        busy = await occupy(pool, 0.3)
        assert await pool.call("add", 1, 2, timeout=30) == 3
        await busy


async def test_the_front_falls_back_when_a_pool_has_no_worker_within_queue_timeout() -> None:
    pools = Pools(
        busy_pool(name="a", queue_timeout=0.2),
        Pool(TARGET, size=1, name="b"),
        workloads={"main": Workload(["a", "b"])},
    )
    async with pools:
        busy = await occupy(pools["a"], 2.0)
        routed = await pools.call_routed("add", 1, 2, workload="main", timeout=30)
        assert (routed.value, routed.pool) == (3, "b")
        assert [(p, type(e)) for p, e in routed.attempts] == [("a", PoolTimeout)]
        await busy


@pytest.mark.parametrize("bad", [math.nan, 0, -1.0, "1"])
def test_queue_timeout_is_checked_like_every_duration(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="queue_timeout"):
        Pool(TARGET, queue_timeout=bad)  # type: ignore[arg-type]
