"""Retries, recycling, session expiry and caps, and the session-lost hook."""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"
FAST_TICK = {"heartbeat_interval": 0.05}


async def test_retries_rerun_a_call_after_a_crash(tmp_path) -> None:
    async with Pool(TARGET, size=2) as pool:
        marker = str(tmp_path / "crashed-once")
        assert await pool.call("crash_once", marker, retries=1) == "ok"


async def test_without_retries_the_crash_reaches_the_caller(tmp_path) -> None:
    async with Pool(TARGET, size=2) as pool:
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("crash_once", str(tmp_path / "m"))


async def test_remote_errors_and_lost_sessions_are_never_retried() -> None:
    async with Pool(TARGET, size=2) as pool:
        with pytest.raises(corral.RemoteError):
            await pool.call("fail", "once", retries=3)
        assert pool.stats().calls_failed == {"RemoteError": 1}
        with pytest.raises(corral.SessionLost):
            await pool.call("exit_now", 1, session="s", retries=3)
        await pool.wait_ready(timeout=10)
        assert pool.stats().restarts == 1  # one death: it ran once, not four times


async def test_on_session_lost_hook_hears_of_each_lost_session() -> None:
    lost: list[tuple[str, str]] = []

    async def rebuild(session: str, error: BaseException) -> None:
        lost.append((session, type(error).__name__))

    async with Pool(TARGET, size=1, on_session_lost=rebuild) as pool:
        await pool.call("remember", "k", 1, session="alice")
        await pool.call("remember", "k", 1, session="bob")
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        assert await pool._wait_until(lambda: len(lost) == 2, 5)
        assert sorted(lost) == [("alice", "SessionLost"), ("bob", "SessionLost")]


async def test_max_requests_recycles_without_failing_a_call() -> None:
    async with Pool(TARGET, size=1, max_requests=5, recycle_jitter=0.0) as pool:
        pids = [await pool.call("pid") for _ in range(22)]
        assert len(set(pids)) >= 4
        # make before break: the first 5 came from one worker, the next from another
        assert len(set(pids[:5])) == 1 and pids[5] != pids[0]
        stats = pool.stats()
        assert stats.recycles >= 4 and stats.calls_failed == {}
        await pool.wait_ready(timeout=10)


async def test_max_lifetime_recycles_an_old_worker() -> None:
    async with Pool(TARGET, size=1, max_lifetime=0.3, **FAST_TICK) as pool:
        first = await pool.call("pid")
        assert await pool._wait_until(lambda: pool.stats().recycles >= 1, 10)
        await pool.wait_ready(timeout=10)
        assert await pool.call("pid") != first


async def test_max_memory_recycles_a_worker_that_grew() -> None:
    limit = 300 * 1024 * 1024
    async with Pool(TARGET, size=1, max_memory=limit, **FAST_TICK) as pool:
        first = await pool.call("pid")
        await pool.call("allocate", 400)
        assert await pool._wait_until(lambda: pool.stats().recycles >= 1, 10)
        await pool.wait_ready(timeout=10)
        assert await pool.call("pid") != first


async def test_a_fresh_worker_over_max_memory_is_not_recycled_in_a_loop() -> None:
    async with Pool(TARGET, size=1, max_memory=1024 * 1024, **FAST_TICK) as pool:
        pid = await pool.call("pid")
        for _ in range(5):  # a few ticks of the supervisor
            await pool.call("sleep", 0.05)
        assert pool.stats().recycles == 0
        assert await pool.call("pid") == pid


async def test_a_worker_holding_sessions_is_recycled_only_once_they_end() -> None:
    async with Pool(TARGET, size=1, max_requests=2, recycle_jitter=0.0) as pool:
        pids = {await pool.call("pid", session="s") for _ in range(4)}
        assert len(pids) == 1 and pool.stats().recycles == 0
        await pool.close_session("s")
        assert await pool._wait_until(lambda: pool.stats().recycles == 1, 5)


async def test_idle_sessions_expire_and_their_end_hook_runs() -> None:
    async with Pool(TARGET, size=1, session_ttl=0.2, **FAST_TICK) as pool:
        await pool.call("remember", "k", "v", session="idle")
        assert await pool._wait_until(lambda: pool.stats().sessions == 0, 5)
        assert await pool.call("recall", "k", session="idle") is None
        assert "idle" in await pool.call("ended_sessions")


async def test_max_sessions_per_worker_makes_new_sessions_wait() -> None:
    async with Pool(TARGET, size=2, max_sessions_per_worker=1) as pool:
        a = await pool.call("whoami", session="a")
        b = await pool.call("whoami", session="b")
        assert a["pid"] != b["pid"]
        with pytest.raises(corral.CallTimeout):
            await pool.call("add", 1, 1, session="c", timeout=0.2)
        waiting = asyncio.ensure_future(pool.call("whoami", session="c"))
        await asyncio.sleep(0)
        assert not waiting.done()
        await pool.close_session("a")
        assert (await waiting)["pid"] == a["pid"]


async def test_reload_replaces_every_worker_without_failing_a_call() -> None:
    async with Pool(TARGET, size=2) as pool:
        before = {w.pid for w in pool.workers}
        stop = asyncio.Event()
        results: list[object] = []

        async def traffic() -> None:
            n = 0
            while not stop.is_set():
                results.append(await pool.call("echo", n) == n)
                n += 1

        callers = [asyncio.ensure_future(traffic()) for _ in range(4)]
        await pool.reload(timeout=20)
        stop.set()
        await asyncio.gather(*callers)
        assert results and all(results)
        assert pool.stats().calls_failed == {}
        assert not before & {w.pid for w in pool.workers}
        assert pool.stats().ready == 2


async def test_an_elastic_pool_grows_while_callers_wait_and_shrinks_when_idle() -> None:
    async with Pool(
        TARGET,
        size=1,
        max_size=3,
        max_concurrency=1,
        idle_timeout=0.3,
        max_spawn_rate=50,
        heartbeat_interval=0.05,
    ) as pool:
        calls = [asyncio.ensure_future(pool.call("sleep", 0.6)) for _ in range(6)]
        assert await pool._wait_until(lambda: pool.stats().ready == 3, 10)
        assert pool.stats().size == 3
        assert await asyncio.gather(*calls) == [0.6] * 6
        assert await pool._wait_until(lambda: pool.stats().live == 1, 10)
        assert pool.stats().size == 1
        assert pool.stats().calls_failed == {}
        assert await pool.call("add", 1, 1) == 2


def test_elastic_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min_size <= size <= max_size"):
        Pool(TARGET, size=4, max_size=2)
