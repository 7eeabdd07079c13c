"""A worker that dies: fast typed errors, a replacement, other callers unharmed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


async def test_exit_is_reported_within_100ms_and_the_pool_refills_within_2s() -> None:
    async with Pool(TARGET, size=2) as pool:
        # Concurrent callers on the other worker keep succeeding throughout.
        async with pool.checkout() as other:
            survivors = [asyncio.ensure_future(other.call("async_sleep", 0.3)) for _ in range(5)]
            started = time.perf_counter()
            with pytest.raises(corral.WorkerCrashed) as info:
                await pool.call("exit_now", 1)
            detected = time.perf_counter() - started
            assert await asyncio.gather(*survivors) == [0.3] * 5
        assert info.value.exit_code == 1
        assert detected < 0.1, f"crash reported after {detected * 1000:.1f} ms"
        refill_started = time.perf_counter()
        await pool.wait_ready(timeout=2.0)
        assert time.perf_counter() - refill_started < 2.0
        assert pool.stats().ready == 2


async def test_sigkill_names_the_signal_and_carries_the_stderr_tail() -> None:
    async with Pool(TARGET, size=1) as pool:
        pid = await pool.call("pid")
        call = asyncio.ensure_future(pool.call("noisy_then_sleep", "last words", 30))
        assert await pool._wait_until(lambda: "last words" in pool.workers[0].stderr_tail, 5)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(corral.WorkerCrashed) as info:
            await call
        err = info.value
        assert err.exit_code == -signal.SIGKILL
        assert "signal SIGKILL" in str(err)
        assert "last words" in (err.stderr_tail or "")
        assert err.pid == pid


async def test_every_pending_call_on_a_dead_worker_fails_at_once() -> None:
    async with Pool(TARGET, size=1, max_concurrency=8) as pool:
        calls = [asyncio.ensure_future(pool.call("async_sleep", 30)) for _ in range(5)]
        await asyncio.sleep(0)  # one turn of the loop: each call is sent
        assert pool.stats().inflight == 5
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 2)
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, corral.WorkerCrashed) for r in results), results


async def test_a_grandchild_holding_stdio_does_not_delay_detection() -> None:
    async with Pool(TARGET, size=1) as pool:
        grandchild = await pool.call("spawn_grandchild")
        started = time.perf_counter()
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        assert time.perf_counter() - started < 0.1
        # The shepherd killed the worker's whole group, grandchild included.
        assert await pool._wait_until(lambda: not _alive(grandchild), 2)


async def test_the_pool_never_breaks_for_good() -> None:
    async with Pool(TARGET, size=2) as pool:
        for _ in range(5):
            with pytest.raises(corral.WorkerCrashed):
                await pool.call("exit_now", 1)
            await pool.wait_ready(1, timeout=5)
        await pool.wait_ready(timeout=10)
        assert await pool.call("add", 1, 2) == 3
        assert pool.stats().restarts == 5


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
