"""corral under anyio (the asyncio backend): cancel scopes, not just task cancellation.

FastAPI and Starlette run handlers under anyio, and users cancel with
``move_on_after``/``fail_after`` and task groups. A scope's cancellation is
delivered again at every ``await`` until the scope exits, so an exit path that
awaits would be cancelled halfway. After any of that: no slot leaked, no worker
evicted that did not fail, and the pool serves as before.

Under trio corral refuses at start with a clear error (docs/fastapi.md).
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"

# anyio's own plugin runs these when pytest-asyncio is off (``nox -s anyio``); the
# ``anyio_backend`` fixture (asyncio) is the suite's, in conftest.py.
pytestmark = pytest.mark.anyio


def _pool(**options: Any) -> Pool:
    # cancel_grace is generous: a worker that acknowledges its Cancels late on a
    # loaded machine has not failed, and must not be evicted.
    return Pool(TARGET, size=2, max_concurrency=64, cancel_grace=60.0, **options)


async def _assert_healthy(pool: Pool, pids: set[int]) -> None:
    """Nothing leaked, nobody evicted, and every worker still answers."""
    await pool.wait_idle(timeout=60)
    stats = pool.stats()
    assert (stats.leased, stats.waiting, stats.inflight, stats.busy) == (0, 0, 0, 0), stats
    assert stats.restarts == 0 and stats.idle == 2, stats
    assert {w.pid for w in pool.workers} == pids
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(pool.call, "add", 1, 2)
    for _ in range(2):
        async with pool.checkout() as worker:
            assert await worker.call("add", 2, 2) == 4
    assert [x async for x in pool.stream("count", 3)] == [0, 1, 2]


async def _one_action(pool: Pool, rng: random.Random) -> None:
    """One call, stream or checkout with a random handler time, under a random scope."""
    kind = rng.choice(["call", "stream", "checkout", "checkout-stream", "sync-call"])
    work = rng.choice([0.0, 0.001, 0.01, 0.05])
    delay = rng.choice([0.0, 0.0005, 0.002, 0.01, 0.03])
    fail = rng.random() < 0.5
    try:
        with anyio.fail_after(delay) if fail else anyio.move_on_after(delay):
            if kind == "call":
                assert await pool.call("async_sleep", work) == work
            elif kind == "sync-call":
                assert await pool.call("sleep", work) == work
            elif kind == "stream":
                async with pool.stream("count_and_report", 5) as items:
                    async for _ in items:
                        await anyio.sleep(work / 5)
            elif kind == "checkout":
                async with pool.checkout() as worker:
                    assert await worker.call("async_sleep", work) == work
                    await worker.call("add", 1, 1)
            else:
                async with pool.checkout() as worker:
                    async for _ in worker.stream("count_and_report", 3):
                        await anyio.sleep(work / 3)
    except TimeoutError:
        pass


@pytest.mark.parametrize("seed", range(4))
async def test_calls_streams_and_checkouts_cancelled_at_random_points_leak_nothing(
    seed: int,
) -> None:
    rng = random.Random(seed)
    async with _pool() as pool:
        pids = {w.pid for w in pool.workers}
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(_one_action, pool, random.Random(rng.random()))
        await _assert_healthy(pool, pids)
        assert pool.stats().calls_cancelled > 0


async def test_a_task_group_cancelled_with_100_calls_in_flight_leaks_nothing() -> None:
    async with _pool() as pool:
        pids = {w.pid for w in pool.workers}
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(pool.call, "async_sleep", 30.0)
            await anyio.wait_all_tasks_blocked()  # every call has reached its worker
            assert pool.stats().inflight == 100
            tg.cancel_scope.cancel()
        assert pool.stats().calls_cancelled == 100
        await _assert_healthy(pool, pids)


async def test_a_checkout_body_cancelled_by_its_scope_gives_the_worker_back() -> None:
    async with _pool() as pool:
        pids = {w.pid for w in pool.workers}
        with anyio.move_on_after(0.2) as scope:
            async with pool.checkout() as worker:
                await worker.call("async_sleep", 30.0)
        assert scope.cancelled_caught
        await _assert_healthy(pool, pids)


async def test_a_checkout_cancelled_while_waiting_for_a_worker_leaves_the_queue() -> None:
    async with _pool() as pool:
        pids = {w.pid for w in pool.workers}
        async with pool.checkout(), pool.checkout():
            with anyio.move_on_after(0.05) as scope:
                async with pool.checkout():
                    pytest.fail("no worker was free")
            assert scope.cancelled_caught
            assert pool.stats().waiting == 0
        await _assert_healthy(pool, pids)


async def test_a_scope_cancelled_before_the_call_starts_sends_nothing() -> None:
    async with _pool() as pool:
        pids = {w.pid for w in pool.workers}
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.call("add", 1, 2)
            pytest.fail("the call ran in a cancelled scope")
        await _assert_healthy(pool, pids)
        assert pool.stats().calls_ok >= 8  # only _assert_healthy's own


async def test_shielded_calls_finish_inside_a_cancelled_scope() -> None:
    async with _pool() as pool:
        with anyio.move_on_after(0.01):
            with anyio.CancelScope(shield=True):
                assert await pool.call("async_sleep", 0.1) == 0.1


def test_under_trio_start_says_corral_needs_asyncio() -> None:
    trio = pytest.importorskip("trio")

    async def main() -> None:
        async with Pool(TARGET, size=1):
            pytest.fail("started under trio")

    with pytest.raises(RuntimeError, match="corral runs on asyncio"):
        trio.run(main)


async def test_pool_errors_pass_through_anyio_scopes_unchanged() -> None:
    async with _pool() as pool:
        with anyio.move_on_after(30):
            with pytest.raises(corral.RemoteError):
                await pool.call("fail", "boom")
