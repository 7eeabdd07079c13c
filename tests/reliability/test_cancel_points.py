"""Cancellation at every await point of a call, a checkout, a session call and a stream.

For n in 0..K-1 a caller is started in a task, the loop is stepped n times
(``await asyncio.sleep(0)``: one turn each, no timing involved) and the task is
cancelled. Whatever point it was at (not started, waiting in the queue, granted
a worker but not yet resumed, sent, streaming), nothing may leak: once the
worker acknowledged, ``wait_idle()`` returns, the pool shows no call in flight,
no lease, no waiter and every worker idle, no worker was evicted, and a normal
call works.

Scenarios:
- ``free``: a pool of 2 with room to spare (with handlers that answer at once,
  the cancel also lands around the reply's arrival);
- ``behind_lease``: size=1, max_concurrency=1, the only worker held by a
  checkout, so the caller waits in the queue;
- ``behind_call``: the same, but the worker's one slot is taken by a stream in
  flight (the caller waits behind a call, and a checkout claims the worker);
- ``granted``: as ``behind_lease``, then the lease ends, which hands the worker
  to the waiting caller synchronously, and the caller is cancelled n steps
  later (n=0: granted but not resumed yet).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from corral import Pool

TARGET = "tests.reliability.workers:app"
K = 8  # loop steps: 0 (never started) .. 7
STEP_TIMEOUT = 10.0


async def op_call(pool: Pool, n: int) -> None:
    await pool.call("async_sleep", 0.2)


async def op_session_call(pool: Pool, n: int) -> None:
    await pool.call("remember", "k", n, 0.2, session=f"cancel-{n}")


async def op_checkout(pool: Pool, n: int) -> None:
    async with pool.checkout() as worker:
        await worker.call("async_sleep", 0.2)


async def op_stream(pool: Pool, n: int) -> None:
    async for _ in pool.stream("echo_stream", n, 5, 0.1):
        pass


async def op_checkout_stream(pool: Pool, n: int) -> None:
    async with pool.checkout() as worker:
        async for _ in worker.stream("echo_stream", n, 5, 0.1):
            pass


async def op_fast_call(pool: Pool, n: int) -> None:
    """Answered within a few loop turns: the cancel may land before, as or after it arrives."""
    assert await pool.call("echo", n) == n


async def op_fast_stream(pool: Pool, n: int) -> None:
    items = [item async for item in pool.stream("echo_stream", n, 50)]
    assert items == [[n, i] for i in range(50)]


OPS: dict[str, Callable[[Pool, int], Awaitable[None]]] = {
    "call": op_call,
    "fast_call": op_fast_call,
    "fast_stream": op_fast_stream,
    "session_call": op_session_call,
    "checkout": op_checkout,
    "stream": op_stream,
    "checkout_stream": op_checkout_stream,
}


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)  # one turn of the loop


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), STEP_TIMEOUT)
    assert task.done()
    if not task.cancelled():
        task.result()  # it finished before the cancel landed: fine, unless it failed


async def _assert_settled(pool: Pool, where: str) -> None:
    await pool.wait_idle(timeout=5)
    stats = pool.stats()
    workers = pool.workers
    state = (stats.inflight, stats.leased, stats.waiting, stats.idle)
    assert state == (0, 0, 0, stats.size), f"{where}: {stats}"
    assert stats.restarts == 0, f"{where}: a worker was evicted: {stats}"
    assert all(w.reserved == 0 and not w.claimed and not w.unacked_cancels for w in workers), (
        f"{where}: {workers}"
    )
    assert await asyncio.wait_for(pool.call("add", 1, 2), STEP_TIMEOUT) == 3
    assert pool.stats().idle == stats.size


@pytest.mark.parametrize("op", OPS)
async def test_cancel_at_each_step_with_room_to_spare(op: str) -> None:
    async with Pool(TARGET, size=2) as pool:
        for n in range(K):
            task = asyncio.ensure_future(OPS[op](pool, n))
            await _steps(n)
            await _cancel(task)
            await _assert_settled(pool, f"{op}, cancelled after {n} steps")


@contextlib.asynccontextmanager
async def _lease_blocker(pool: Pool):
    checkout = pool.checkout()
    await asyncio.wait_for(checkout.__aenter__(), STEP_TIMEOUT)
    try:
        yield checkout
    finally:
        await checkout.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def _call_blocker(pool: Pool):
    """A stream in flight, holding the worker's only slot until it is drained.

    It has more items than the stream window: the worker sends a window's worth
    and then waits for credit, which only comes once the consumer takes them.
    """
    items = 4 * pool.config.stream_window
    stream = pool.stream("echo_stream", "blocker", items)
    assert await asyncio.wait_for(stream.__anext__(), STEP_TIMEOUT) == ["blocker", 0]
    try:
        yield stream
    finally:
        rest = await asyncio.wait_for(_drain(stream), STEP_TIMEOUT)
        assert rest == [["blocker", i] for i in range(1, items)]


async def _drain(stream) -> list[object]:
    return [item async for item in stream]


SATURATED = {"size": 1, "max_concurrency": 1}


@pytest.mark.parametrize("blocker", ["behind_lease", "behind_call"])
@pytest.mark.parametrize("op", OPS)
async def test_cancel_at_each_step_while_queued(op: str, blocker: str) -> None:
    make_blocker = _lease_blocker if blocker == "behind_lease" else _call_blocker
    async with Pool(TARGET, **SATURATED) as pool:
        for n in range(K):
            async with make_blocker(pool):
                task = asyncio.ensure_future(OPS[op](pool, n))
                await _steps(n)
                if n:  # its first step queued it: the only slot is taken
                    assert pool.stats().waiting == 1, pool.stats()
                await _cancel(task)
                assert pool.stats().waiting == 0, pool.stats()
            await _assert_settled(pool, f"{op} {blocker}, cancelled after {n} steps")


@pytest.mark.parametrize("op", OPS)
async def test_cancel_at_each_step_after_being_granted_the_worker(op: str) -> None:
    async with Pool(TARGET, **SATURATED) as pool:
        for n in range(K):
            checkout = pool.checkout()
            await asyncio.wait_for(checkout.__aenter__(), STEP_TIMEOUT)
            task = asyncio.ensure_future(OPS[op](pool, n))
            assert await pool._wait_until(lambda: pool.stats().waiting == 1, 5)
            # Ending the lease hands the worker to the waiting caller at once,
            # before the caller's task runs again.
            await checkout.__aexit__(None, None, None)
            assert pool.stats().waiting == 0 and pool.stats().leased + pool.stats().inflight == 1
            await _steps(n)
            await _cancel(task)
            await _assert_settled(pool, f"{op} granted, cancelled after {n} steps")


async def _step_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Turn the loop one step at a time until ``condition()``; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0)


@pytest.mark.parametrize("op", ["fast_call", "fast_stream", "checkout_fast_call"])
async def test_cancel_at_each_step_after_the_reply_arrived(op: str) -> None:
    """The worker's last frame has been received (the call is settled in the pool)
    and the caller is cancelled 0..K-1 steps later: at 0, before it resumed."""

    async def checkout_fast_call(pool: Pool, n: int) -> None:
        async with pool.checkout() as worker:
            assert await worker.call("echo", n) == n

    run = checkout_fast_call if op == "checkout_fast_call" else OPS[op]
    async with Pool(TARGET, size=2) as pool:

        def served() -> int:
            return sum(w.calls_served for w in pool.workers)

        outcomes = []
        for n in range(K):
            before = served()
            task = asyncio.ensure_future(run(pool, n))
            await _step_until(lambda before=before: served() > before)
            await _steps(n)
            await _cancel(task)
            outcomes.append("cancelled" if task.cancelled() else "done")
            await _assert_settled(pool, f"{op}, cancelled {n} steps after its reply")
        assert "done" in outcomes  # later steps let the caller finish first
