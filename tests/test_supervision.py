"""Heartbeats, start-up deadlines and crash signals: the supervisor's side of things."""

from __future__ import annotations

import signal
import time

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


async def test_a_busy_sync_handler_still_answers_heartbeats() -> None:
    async with Pool(TARGET, size=1, heartbeat_interval=0.05, heartbeat_timeout=0.4) as pool:
        pid = await pool.call("pid")
        assert await pool.call("sleep", 1.2) == 1.2  # three heartbeat timeouts long
        assert await pool.call("pid") == pid
        assert pool.stats().restarts == 0


async def test_a_worker_holding_the_gil_misses_heartbeats_and_is_replaced() -> None:
    async with Pool(TARGET, size=1, heartbeat_interval=0.05, heartbeat_timeout=0.4) as pool:
        started = time.monotonic()
        with pytest.raises(corral.WorkerCrashed, match="missed heartbeats") as info:
            await pool.call("hold_the_gil")  # no timeout: only the heartbeat can tell
        assert time.monotonic() - started < 5.0
        assert info.value.exit_code == -signal.SIGKILL
        await pool.wait_ready(timeout=10)
        assert await pool.call("add", 1, 1) == 2


async def test_a_worker_that_never_becomes_ready_fails_the_start() -> None:
    started = time.monotonic()
    with pytest.raises(corral.WorkerStartError, match=r"did not become ready within 0\.5s"):
        async with Pool("tests.workers.slow_start:app", size=1, startup_timeout=0.5):
            pass
    assert time.monotonic() - started < 5.0


async def test_a_segfault_is_reported_as_sigsegv() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(corral.WorkerCrashed) as info:
            await pool.call("segfault")
        assert info.value.exit_code == -signal.SIGSEGV
        assert "signal SIGSEGV" in str(info.value)
        await pool.wait_ready(timeout=10)
