"""aclose(): refuse new work, drain, then Shutdown, SIGTERM, SIGKILL; bounded and idempotent."""

from __future__ import annotations

import asyncio
import time

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


async def test_calls_in_flight_finish_during_close() -> None:
    pool = Pool(TARGET, size=1)
    await pool.start()
    call = asyncio.ensure_future(pool.call("async_sleep", 0.3))
    await asyncio.sleep(0)
    await pool.aclose()
    assert await call == 0.3


async def test_new_calls_are_refused_while_closing() -> None:
    pool = Pool(TARGET, size=1)
    await pool.start()
    call = asyncio.ensure_future(pool.call("async_sleep", 0.3))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(pool.aclose())
    await asyncio.sleep(0)
    with pytest.raises(corral.PoolClosed):
        await pool.call("add", 1, 1)
    await closing
    assert await call == 0.3


async def test_waiters_are_told_the_pool_closed() -> None:
    pool = Pool(TARGET, size=1)
    await pool.start()
    async with pool.checkout():
        waiter = asyncio.ensure_future(pool.call("add", 1, 1))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(pool.aclose())
        with pytest.raises(corral.PoolClosed):
            await waiter
    await closing


async def test_close_is_bounded_with_a_stuck_worker() -> None:
    pool = Pool(TARGET, size=1, drain_timeout=0.2, shutdown_grace=0.2, kill_grace=0.2)
    await pool.start()
    stuck = asyncio.ensure_future(pool.call("hold_the_gil"))
    assert await pool._wait_until(lambda: "holding the GIL" in pool.workers[0].stderr_tail, 5)
    started = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - started < 0.2 + 0.2 + 0.2 + 1.0
    with pytest.raises(corral.PoolClosed):
        await stuck


async def test_a_worker_ignoring_sigterm_is_killed() -> None:
    pool = Pool(TARGET, size=1, drain_timeout=0.1, shutdown_grace=0.1, kill_grace=0.3)
    await pool.start()
    await pool.call("ignore_sigterm")
    stuck = asyncio.ensure_future(pool.call("sleep", 60))
    await asyncio.sleep(0)
    started = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - started < 0.1 + 0.1 + 0.3 + 1.0
    with pytest.raises(corral.PoolClosed):
        await stuck


async def test_aclose_is_idempotent_and_safe_from_several_tasks() -> None:
    pool = Pool(TARGET, size=2)
    await pool.start()
    await asyncio.gather(pool.aclose(), pool.aclose(), pool.aclose())
    await pool.aclose()
    assert pool.stats().closed
    assert pool.workers == ()


async def test_closing_a_pool_that_never_started_is_a_no_op() -> None:
    await Pool(TARGET, size=1).aclose()


async def test_a_pool_cannot_be_started_twice() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(corral.PoolClosed, match="already started"):
            await pool.start()


async def test_on_shutdown_hooks_run_on_close(tmp_path) -> None:
    marker = tmp_path / "shut-down"
    async with Pool("tests.workers.hooks:app", size=1, env={"CORRAL_TEST_MARKER": str(marker)}):
        pass
    assert marker.read_text() == "bye"


async def test_sync_on_shutdown_hooks_run_where_sync_code_runs_on_the_lane(tmp_path) -> None:
    marker = tmp_path / "bye"
    env = {"CORRAL_TEST_MARKER": str(marker)}
    async with Pool("tests.workers.hooks:lane_app", size=1, env=env) as pool:
        worker = pool.workers[0]
    assert marker.read_text() == "bye"
    assert worker.exit_code == 0


async def test_a_launch_cut_off_by_close_is_awaited_to_its_end(monkeypatch) -> None:
    """A replacement being launched when aclose() runs: its process is reaped, not left."""
    import gc
    import os
    import signal
    import warnings

    import psutil

    import corral._launch._local as local

    real_open = local.open_pipe_connection
    stalled = asyncio.Event()
    opened = 0

    async def open_then_stall(read_fd, write_fd, *args, control_fd=None):  # type: ignore[no-untyped-def]
        nonlocal opened
        opened += 1
        if opened == 1:  # the first worker starts as usual
            return await real_open(read_fd, write_fd, *args, control_fd=control_fd)
        stalled.set()  # the replacement's shepherd runs; its launch waits here
        try:
            await asyncio.Event().wait()
        finally:  # owns the descriptors, as the real one does
            for fd in (read_fd, write_fd, control_fd):
                os.close(fd)
        raise AssertionError("unreachable")

    monkeypatch.setattr(local, "open_pipe_connection", open_then_stall)
    pool = Pool(TARGET, size=1, restart_backoff=0.01)
    await pool.start()
    first = pool.workers[0]
    assert first.pid is not None
    before = {c.pid for c in psutil.Process().children()}
    os.kill(first.pid, signal.SIGKILL)
    await asyncio.wait_for(stalled.wait(), 10)
    replacement = {c.pid for c in psutil.Process().children()} - before
    assert replacement, "the replacement's shepherd is running"
    (starting,) = [w for w in pool.workers if w is not first]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await pool.aclose()
        exit_code = starting.exit_code  # reported before aclose() returned
        gc.collect()
    assert exit_code is not None
    for pid in replacement:  # reaped before aclose() returned: not even a zombie
        assert not psutil.pid_exists(pid), pid
    assert not [w for w in caught if "still running" in str(w.message)], caught
