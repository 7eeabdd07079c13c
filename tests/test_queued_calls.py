"""Plain calls that find every slot taken wait in the pool's queue as calls: the pool
sends each one itself when a slot frees up, in the order they came, so a queued call
is on its worker by the time the call before it has returned to its caller.

Everything a queued call could meet on the way is here: its caller cancelled before
it was sent and after, an argument that cannot be encoded, its worker dying, the
pool closing, and a burst of callers many times the pool's slots.
"""

from __future__ import annotations

import asyncio

import pytest

from corral import EncodeError, Pool, PoolClosed, SessionLost, WorkerCrashed

TARGET = "tests.workers.queued:app"


def one_slot(**options: object) -> Pool:
    """One worker that holds one call at a time: a second call must queue."""
    return Pool(TARGET, size=1, max_concurrency=1, **options)  # type: ignore[arg-type]


async def occupy(pool: Pool, method: str, *args: object) -> asyncio.Task[object]:
    """Start a call that takes the only slot (its first step runs before this returns)."""
    task = asyncio.create_task(pool.call(method, *args))
    await asyncio.sleep(0)
    assert pool.stats().busy == 1
    return task


async def queue_behind(pool: Pool, coros: list) -> list[asyncio.Task]:  # type: ignore[type-arg]
    """Start the calls as tasks, in order; each has queued when this returns."""
    tasks = [asyncio.create_task(coro) for coro in coros]
    await asyncio.sleep(0)  # every task's first step runs, in the order they were made
    assert pool.stats().waiting == len(tasks)
    return tasks


async def hold_then_look(pool: Pool, seconds: float) -> tuple[object, int]:
    """Hold the only slot, then, in the same step as the reply wakes this caller,
    count the calls in flight on the worker."""
    result = await pool.call("hold", seconds)
    return result, len(pool.workers[0]._pending)


async def test_a_queued_call_is_sent_when_the_slot_frees_not_when_its_caller_wakes() -> None:
    async with one_slot() as pool:
        holding = asyncio.create_task(hold_then_look(pool, 0.3))
        await asyncio.sleep(0)
        (queued,) = await queue_behind(pool, [pool.call("ticket")])
        # The reply freed the slot and the pool sent the queued call in the same
        # step: it is on the worker before anyone else has run, the holder included.
        assert await holding == (False, 1)
        assert pool.stats().waiting == 0
        assert await queued == 1


async def test_queued_calls_are_sent_in_the_order_they_were_made() -> None:
    async with one_slot() as pool:
        holding = await occupy(pool, "hold", 0.2)
        queued = await queue_behind(pool, [pool.call("ticket") for _ in range(20)])
        await holding
        assert [await task for task in queued] == list(range(1, 21))


async def test_a_burst_of_callers_many_times_the_slots_each_get_their_own_answer() -> None:
    async with Pool(TARGET, size=2, max_concurrency=2) as pool:
        results = await asyncio.gather(*(pool.call("echo", i) for i in range(400)))
        assert results == list(range(400))
        stats = pool.stats()
        assert (stats.busy, stats.waiting) == (0, 0)
        assert all(w.inflight == 0 for w in pool.workers)


async def test_a_call_cancelled_while_queued_never_runs_and_frees_its_place() -> None:
    async with one_slot() as pool:
        holding = await occupy(pool, "hold", 0.3)
        cancelled, after = await queue_behind(pool, [pool.call("ticket"), pool.call("ticket")])
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert pool.stats().waiting == 1
        await holding
        assert await after == 1  # the cancelled one never reached the worker
        assert await pool.call("tickets") == 1


async def test_a_call_cancelled_after_the_pool_sent_it_is_cancelled_in_the_worker() -> None:
    async with one_slot() as pool:
        holding = asyncio.create_task(hold_then_look(pool, 0.2))
        await asyncio.sleep(0)
        (queued,) = await queue_behind(pool, [pool.call("hold", 30.0)])
        worker = pool.workers[0]
        assert await holding == (False, 1)  # sent by the pool, its caller not yet run
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        # The worker acknowledges the cancel and the slot comes back: the next call runs.
        assert await asyncio.wait_for(pool.call("ticket"), 10) == 1
        assert worker.unacked_cancels == 0
        assert pool.stats().restarts == 0


async def test_a_queued_call_that_cannot_be_encoded_fails_alone() -> None:
    async with one_slot() as pool:
        holding = await occupy(pool, "hold", 0.2)
        bad, good = await queue_behind(pool, [pool.call("echo", object()), pool.call("ticket")])
        await holding
        with pytest.raises(EncodeError, match="echo"):
            await bad
        assert await good == 1
        assert pool.workers[0].inflight == 0


async def test_queued_calls_on_a_worker_that_dies_fail_or_retry_on_its_replacement() -> None:
    async with one_slot() as pool:
        crashing = await occupy(pool, "crash")
        plain, retried = await queue_behind(
            pool, [pool.call("echo", 1), pool.call("echo", 2, retries=1)]
        )
        with pytest.raises(WorkerCrashed):
            await crashing
        # The pool sent the first queued call to the dying worker, or to its
        # replacement: either way each caller gets one outcome.
        outcomes = await asyncio.gather(plain, retried, return_exceptions=True)
        assert outcomes[1] == 2
        assert outcomes[0] == 1 or isinstance(outcomes[0], WorkerCrashed)
        assert await pool.call("echo", 3) == 3


async def test_queued_calls_fail_with_pool_closed_when_the_pool_closes() -> None:
    pool = one_slot(shutdown_grace=5.0)
    await pool.__aenter__()
    try:
        holding = await occupy(pool, "hold", 0.3)
        queued = await queue_behind(pool, [pool.call("ticket") for _ in range(3)])
    finally:
        await pool.__aexit__(None, None, None)
    for task in queued:
        with pytest.raises(PoolClosed):
            await task
    assert await holding is False  # the call in flight was let finish


async def test_a_queued_session_call_waits_for_its_own_worker_and_runs_there() -> None:
    async with Pool(TARGET, size=2, max_concurrency=1) as pool:
        home = await pool.call("pid", session="s")
        holding = asyncio.create_task(pool.call("hold", 0.3, session="s"))
        await asyncio.sleep(0)
        (queued,) = await queue_behind(pool, [pool.call("pid", session="s")])
        assert await pool.call("pid") != home  # the other worker is free meanwhile
        assert pool.stats().waiting == 1  # and the session call still waits for its own
        assert await holding is False
        assert await queued == home


async def test_a_queued_session_call_whose_worker_dies_is_told_once() -> None:
    async with Pool(TARGET, size=2, max_concurrency=1) as pool:
        await pool.call("pid", session="s")
        crashing = asyncio.create_task(pool.call("crash", session="s"))
        await asyncio.sleep(0)
        (queued,) = await queue_behind(pool, [pool.call("pid", session="s")])
        with pytest.raises(SessionLost):
            await crashing
        # The crash was told to the call in flight: the queued one starts the session afresh.
        assert isinstance(await queued, int)
        assert isinstance(await pool.call("pid", session="s"), int)


async def test_a_burst_that_reaches_the_worker_in_one_read_keeps_every_outcome_apart() -> None:
    # 40 calls sent in one loop round go out in one write and are read by the worker
    # together: a handler that raises, a result over the size limit, a print and a
    # cancelled call in the middle of the burst touch no other call's outcome.
    from corral import PayloadTooLarge, RemoteError

    async with Pool(TARGET, size=1, max_concurrency=64, max_message_size=64 * 1024) as pool:
        await pool.call("echo", 0)
        kinds = ["echo", "boom", "big", "shout", "hold"]
        calls = []
        for i in range(40):
            kind = kinds[i % len(kinds)]
            if kind == "big":
                calls.append(pool.call("big", 128 * 1024))
            elif kind == "hold":
                calls.append(pool.call("hold", 30.0))
            else:
                calls.append(pool.call(kind, i if kind != "shout" else f"line {i}"))
        tasks = [asyncio.create_task(call) for call in calls]
        await asyncio.sleep(0)  # every call sent, in one round
        held = [t for i, t in enumerate(tasks) if kinds[i % len(kinds)] == "hold"]
        for task in held:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            kind = kinds[i % len(kinds)]
            if kind == "echo":
                assert outcome == i
            elif kind == "boom":
                assert isinstance(outcome, RemoteError) and f"boom {i}" in outcome.message
            elif kind == "big":
                assert isinstance(outcome, PayloadTooLarge)
            elif kind == "shout":
                assert outcome == f"line {i}"
            else:
                assert isinstance(outcome, asyncio.CancelledError)
        assert await asyncio.wait_for(pool.call("echo", "after"), 10) == "after"
        assert pool.stats().restarts == 0
