"""Worker output never reaches the wire; big payloads pass; over the limit is refused."""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import Pool
from corral._framing import DEFAULT_MAX_MESSAGE_SIZE

TARGET = "tests.workers.basic:app"
MIB = 1024 * 1024


async def test_print_and_raw_writes_to_fd1_break_nothing() -> None:
    async with Pool(TARGET, size=1) as pool:
        pid = await pool.call("pid")
        for i in range(3):
            assert await pool.call("noisy", f"hello {i}") == f"hello {i}"
        assert await pool.call("pid") == pid
        worker = pool.workers[0]
        assert await pool._wait_until(lambda: "raw bytes on fd 1" in worker.stderr_tail, 5)
        assert "hello 2" in worker.stderr_tail


async def test_500_concurrent_calls_over_2_workers_get_their_own_answers() -> None:
    async with Pool(TARGET, size=2) as pool:
        results = await asyncio.gather(*(pool.call("add", i, 1000) for i in range(500)))
        assert results == [i + 1000 for i in range(500)]
        stats = pool.stats()
        assert stats.calls_ok == 500 and stats.inflight == 0 and stats.waiting == 0


async def test_a_64_mib_bytes_argument_round_trips() -> None:
    payload = bytes(range(256)) * (64 * MIB // 256)
    async with Pool(TARGET, size=1) as pool:
        assert await pool.call("echo", payload) == payload


async def test_over_the_default_limit_is_payload_too_large_and_nothing_breaks() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("echo", b"x" * (DEFAULT_MAX_MESSAGE_SIZE + 1))
        assert await pool.call("add", 1, 1) == 2
