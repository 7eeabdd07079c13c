"""Workers that misbehave on the wire: a typed error, an eviction, and nobody else hurt.

Each hostile handler (tests/reliability/workers.py) writes straight onto its
worker's protocol write descriptor. The pool must answer the caller with
ProtocolError (every call and stream pending on that worker too), evict and replace the
worker, and leave the parent and the other workers alone: a call held in flight
on another worker the whole time still gets its own answer, ``wait_ready()``
refills the pool, and the bad worker's process is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest
import structlog

import corral
from corral import Pool

TARGET = "tests.reliability.workers:app"
STEP_TIMEOUT = 10.0  # bound on every single await below; nothing should come close

MIB = 1024 * 1024


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def _bounded(awaitable, timeout: float = STEP_TIMEOUT):
    return await asyncio.wait_for(awaitable, timeout)


async def _check_replaced(pool: Pool, bad_pid: int, good_pid: int) -> None:
    """The bad worker is gone for good, the good one untouched, the pool full and working."""
    await pool.wait_ready(timeout=STEP_TIMEOUT)
    pids = {w.pid for w in pool.workers}
    assert bad_pid not in pids
    assert good_pid in pids
    assert await pool._wait_until(lambda: not _alive(bad_pid), 5), f"pid {bad_pid} still alive"
    assert await _bounded(pool.call("add", 1, 2)) == 3
    stats = pool.stats()
    assert stats.restarts == 1, stats
    assert stats.ready == 2 and stats.inflight == 0 and stats.leased == 0, stats


HOSTILE = [
    pytest.param("garbage_frame", "malformed message", id="garbage-bytes"),
    pytest.param("huge_length_header", "4294967295 bytes announced", id="4GiB-length"),
    pytest.param("zero_length_frame", "empty frame", id="zero-length"),
    pytest.param("truncated_frame_then_close", "stream ended inside a frame", id="truncated-close"),
    pytest.param("truncated_frame_then_exit", "stream ended inside a frame", id="truncated-exit"),
    pytest.param("reply_for_unknown_id", "unknown or settled call id 999999", id="unknown-id"),
]


@pytest.mark.parametrize(("method", "reason"), HOSTILE)
async def test_hostile_frame_is_a_protocol_error_and_only_that_worker_goes(
    method: str, reason: str
) -> None:
    async with Pool(TARGET, size=2) as pool:
        async with pool.checkout() as good, pool.checkout() as bad:
            good_pid, bad_pid = good.pid, bad.pid
            assert good_pid and bad_pid and good_pid != bad_pid
            # In flight on the good worker for the whole episode, released at the end.
            held_good = asyncio.ensure_future(good.call("hold", "good"))
            # Another call and a stream pending on the bad worker: they fail the same way.
            held_bad = asyncio.ensure_future(bad.call("hold", "bad"))
            stream = bad.stream("echo_stream", "s", 4 * pool.config.stream_window)
            items = [await _bounded(stream.__anext__())]

            with pytest.raises(corral.ProtocolError) as info:
                await _bounded(bad.call(method))
            with pytest.raises(corral.ProtocolError):
                await _bounded(held_bad)
            with pytest.raises(corral.ProtocolError):
                async for item in stream:  # what arrived before the violation, then the error
                    items.append(item)
            assert items == [["s", i] for i in range(len(items))]
            assert bad.failed

            # The other worker never noticed: a concurrent call works, the held one is
            # still in flight, and it gets its own answer once released.
            assert await _bounded(good.call("add", 20, 22)) == 42
            assert not held_good.done()
            await _bounded(good.call("release", "good"))
            assert await _bounded(held_good) == "good"
            assert not good.failed

        err = info.value
        assert reason in str(err)
        assert err.worker_id == bad.id and err.pid == bad_pid and err.method == method
        assert pool.stats().calls_failed.get("ProtocolError") == 3
        await _check_replaced(pool, bad_pid, good_pid)


async def test_a_duplicate_reply_evicts_the_worker_and_fails_its_other_calls() -> None:
    """The first of two replies is indistinguishable from an honest one: that call
    gets it. The second is the violation: every call still pending on the worker
    fails with ProtocolError and the worker is evicted."""
    async with Pool(TARGET, size=2) as pool:
        async with pool.checkout() as good, pool.checkout() as bad:
            good_pid, bad_pid = good.pid, bad.pid
            held_good = asyncio.ensure_future(good.call("hold", "good"))
            held_bad = asyncio.ensure_future(bad.call("hold", "bad"))

            assert await _bounded(bad.call("duplicate_reply", "v")) == "v"
            with pytest.raises(corral.ProtocolError, match="unknown or settled call id") as info:
                await _bounded(held_bad)
            assert await pool._wait_until(lambda: bad.failed, 5)

            assert await _bounded(good.call("add", 20, 22)) == 42
            assert not held_good.done()
            await _bounded(good.call("release", "good"))
            assert await _bounded(held_good) == "good"

        assert info.value.worker_id == bad.id and info.value.pid == bad_pid
        await _check_replaced(pool, bad_pid, good_pid)


async def test_a_duplicate_reply_with_nothing_else_pending_still_evicts() -> None:
    async with Pool(TARGET, size=2) as pool:
        async with pool.checkout() as good, pool.checkout() as bad:
            good_pid, bad_pid = good.pid, bad.pid
            assert await _bounded(bad.call("duplicate_reply", 7)) == 7
            assert await pool._wait_until(lambda: bad.failed, 5)
            with pytest.raises(corral.CorralError):
                await _bounded(bad.call("add", 1, 1))  # an evicted worker takes no calls
            assert await _bounded(good.call("add", 1, 1)) == 2
        await _check_replaced(pool, bad_pid, good_pid)


async def test_a_worker_killed_mid_frame_is_a_crash_not_a_protocol_error() -> None:
    """docs/operations.md: a worker that dies mid-call (SIGKILL, OOM kill) is a
    WorkerCrashed carrying its exit code; decision 0007: death is read from the exit
    status, never from pipe EOF. Dying halfway through a frame is still dying."""
    async with Pool(TARGET, size=2) as pool:
        async with pool.checkout() as good, pool.checkout() as bad:
            good_pid, bad_pid = good.pid, bad.pid
            with pytest.raises(corral.CorralError) as info:
                await _bounded(bad.call("killed_mid_frame"))
            assert await _bounded(good.call("add", 1, 1)) == 2
        await _check_replaced(pool, bad_pid, good_pid)
        err = info.value
        assert isinstance(err, corral.WorkerCrashed), repr(err)
        assert err.exit_code == -signal.SIGKILL


@pytest.fixture
def quiet_structlog():
    """structlog as configured (every event rendered), but written to /dev/null, so
    ``pytest -s`` is not buried under megabytes of worker output. Restored after."""
    saved = structlog.get_config()
    with open(os.devnull, "w") as sink:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
        try:
            yield
        finally:
            structlog.configure(**saved)


@pytest.fixture
def drop_worker_stderr_logs(quiet_structlog):
    """The operations guide's recipe: drop ``worker.stderr`` log events (restored after)."""
    saved = structlog.get_config()

    def drop(logger, method_name, event_dict):
        if event_dict.get("event") == "worker.stderr":
            raise structlog.DropEvent
        return event_dict

    structlog.configure(processors=[drop, *saved["processors"]])
    try:
        yield
    finally:
        structlog.configure(**saved)


async def _flood(pool: Pool, total: int, line: int) -> None:
    me = psutil.Process()
    rss_before = me.memory_info().rss
    async with pool.checkout() as good, pool.checkout() as noisy:
        good_pid, noisy_pid = good.pid, noisy.pid
        flood = asyncio.ensure_future(noisy.call("flood_stderr", total, line))
        # The other worker keeps answering while the flood is being drained.
        served = 0
        while not flood.done():
            assert await _bounded(good.call("echo", served)) == served
            served += 1
        assert await _bounded(flood) == total
        assert not noisy.failed
        assert await _bounded(noisy.call("add", 1, 1)) == 2
        handle = next(w for w in pool.workers if w.pid == noisy_pid)
        assert await pool._wait_until(lambda: "flood done" in handle.stderr_tail, 5)
        tail = handle.stderr_tail
    grown = me.memory_info().rss - rss_before
    stats = pool.stats()
    assert stats.restarts == 0 and stats.ready == 2, stats
    assert {w.pid for w in pool.workers} == {good_pid, noisy_pid}
    assert len(tail) <= 8 * 1024, len(tail)
    assert grown < 64 * MIB, f"parent RSS grew by {grown / MIB:.1f} MiB"
    print(
        f"\nstderr flood of {total / MIB:.0f} MiB (lines of {line or 'inf'} bytes): "
        f"{served} calls served meanwhile, RSS +{grown / MIB:.1f} MiB, tail {len(tail)} chars"
    )


@pytest.mark.usefixtures("quiet_structlog")
async def test_100_mib_of_stderr_without_a_newline_is_harmless() -> None:
    async with Pool(TARGET, size=2) as pool:
        await _flood(pool, 100 * MIB, 0)


@pytest.mark.usefixtures("drop_worker_stderr_logs")
async def test_100_mib_of_stderr_lines_is_harmless() -> None:
    async with Pool(TARGET, size=2) as pool:
        await _flood(pool, 100 * MIB, 1024)


@pytest.mark.usefixtures("quiet_structlog")
async def test_a_flood_rendered_line_by_line_is_harmless() -> None:
    """Unfiltered, every line is rendered by the logger: ~60 us a line on the parent's
    loop, so the volume is kept modest here; the checks are the same."""
    async with Pool(TARGET, size=2) as pool:
        await _flood(pool, 8 * MIB, 4096)


def test_the_hostile_handlers_find_the_wire_fd_where_the_launcher_puts_it() -> None:
    # Guard for the hostile handlers: argv carries --fds READ,WRITE,CONTROL.
    from corral._launch import WorkerSpec

    argv = WorkerSpec("w", TARGET).command(10, 11, 12)
    assert argv[argv.index("--fds") + 1].split(",")[1] == "11"
