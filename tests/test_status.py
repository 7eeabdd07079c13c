"""pool.status(): one snapshot of every worker, the wait queue and the recent evictions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import corral
from corral import Eviction, Pool, PoolStatus, WorkerInfo
from corral._status import EvictionLog

TARGET = "tests.workers.basic:app"


async def test_status_lists_each_worker_with_its_pid_state_and_calls_served() -> None:
    async with Pool(TARGET, size=2) as pool:
        await asyncio.gather(*(pool.call("add", i, i) for i in range(20)))
        status = pool.status()
        assert isinstance(status, PoolStatus)
        assert status.name == pool.name and status.target == TARGET
        assert status.state == "open"
        assert [w.id for w in status.workers] == [w.id for w in pool.workers]
        assert {w.pid for w in status.workers} == {w.pid for w in pool.workers}
        for info in status.workers:
            assert isinstance(info, WorkerInfo)
            assert info.state == "ready"
            assert info.inflight == 0 and info.sessions == 0 and not info.leased
            assert 0 <= info.uptime < 60
            assert abs(info.started_at - (time.time() - info.uptime)) < 1.0
            assert info.rss is None  # read only when asked
        assert sum(w.calls_served for w in status.workers) == 20
        assert status.stats.calls_ok == 20
        assert status.evictions == ()


async def test_rss_is_read_only_when_asked() -> None:
    async with Pool(TARGET, size=1) as pool:
        (info,) = pool.status(rss=True).workers
        assert info.rss is not None and info.rss > 1024 * 1024


async def test_calls_in_flight_sessions_and_waiting_callers_show() -> None:
    async with Pool(TARGET, size=1, max_concurrency=1) as pool:
        await pool.call("remember", "k", 1, session="a")
        await pool.call("remember", "k", 2, session="b")
        async with pool.checkout() as lease:
            waiting = [asyncio.ensure_future(pool.call("add", i, 1)) for i in range(3)]
            session_waiter = asyncio.ensure_future(pool.call("recall", "k", session="a"))
            assert await pool._wait_until(lambda: pool.stats().waiting == 4, 5)
            status = pool.status()
            (info,) = status.workers
            assert info.id == lease.id
            assert info.state == "busy" and info.leased and info.sessions == 2
            assert (status.queue.calls, status.queue.checkouts, status.queue.sessions) == (3, 0, 1)
            assert status.queue.total == 4
        assert await asyncio.gather(*waiting) == [1, 2, 3]
        assert await session_waiter == 1
        assert pool.status().queue.total == 0


async def test_a_killed_worker_is_recorded_with_its_pid_and_how_it_died() -> None:
    async with Pool(TARGET, size=2) as pool:
        victim = pool.workers[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        assert await pool._wait_until(lambda: len(pool.status().evictions) == 1, 10)
        await pool.wait_ready(timeout=10)
        status = pool.status()
        (eviction,) = status.evictions
        assert isinstance(eviction, Eviction)
        assert (eviction.worker_id, eviction.pid) == (victim.id, victim.pid)
        assert eviction.kind == "died"
        assert eviction.reason == "signal SIGKILL"
        assert abs(eviction.time - time.time()) < 10
        assert victim.pid not in {w.pid for w in status.workers}
        assert len(status.workers) == 2


async def test_an_eviction_by_the_pool_carries_the_pool_s_reason() -> None:
    async with Pool(TARGET, size=1, heartbeat_interval=0.05, heartbeat_timeout=0.4) as pool:
        pid = pool.workers[0].pid
        with pytest.raises(Exception, match="missed heartbeats"):
            await pool.call("hold_the_gil")
        assert await pool._wait_until(lambda: len(pool.status().evictions) == 1, 10)
        (eviction,) = pool.status().evictions
        assert eviction.pid == pid
        assert eviction.kind == "evicted"
        assert eviction.reason.startswith("missed heartbeats")


async def test_a_recycled_worker_is_recorded_as_recycled() -> None:
    async with Pool(TARGET, size=1, max_requests=3, recycle_jitter=0.0) as pool:
        first = pool.workers[0].pid
        for i in range(3):
            await pool.call("add", i, 1)
        assert await pool._wait_until(lambda: len(pool.status().evictions) == 1, 10)
        (eviction,) = pool.status().evictions
        assert (eviction.pid, eviction.kind) == (first, "recycled")
        assert "max_requests" in eviction.reason


async def test_closing_the_pool_records_no_eviction() -> None:
    pool = Pool(TARGET, size=2)
    async with pool:
        await pool.call("add", 1, 1)
    status = pool.status()
    assert status.state == "closed"
    assert status.workers == () and status.evictions == ()


async def test_the_snapshot_is_plain_json() -> None:
    async with Pool(TARGET, size=1) as pool:
        await pool.call("add", 1, 1, session="s")
        os.kill(pool.workers[0].pid or 0, signal.SIGKILL)
        assert await pool._wait_until(lambda: len(pool.status().evictions) == 1, 10)
        await pool.wait_ready(timeout=10)
        body = json.loads(json.dumps(pool.status(rss=True).to_dict()))
    assert body["pool"] == pool.name and body["state"] == "open"
    assert body["size"] == 1 and body["ready"] == 1
    (worker,) = body["workers"]
    assert set(worker) == {
        "id",
        "pid",
        "state",
        "started_at",
        "uptime",
        "calls_served",
        "inflight",
        "sessions",
        "leased",
        "rss",
        "note",
        "node_id",
        "node_address",
    }
    assert worker["node_id"] is None and body["nodes"] == []  # a local worker
    assert worker["rss"] > 0
    (eviction,) = body["evictions"]
    assert eviction["kind"] == "died" and eviction["reason"] == "signal SIGKILL"
    assert body["queue"] == {"total": 0, "calls": 0, "checkouts": 0, "sessions": 0}
    assert body["calls_ok"] == 1 and body["restarts"] == 1


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=200), st.integers(1, 50))
def test_the_eviction_log_keeps_the_newest_first_and_stays_bounded(
    pids: list[int], limit: int
) -> None:
    log = EvictionLog(limit)
    for pid in pids:
        log.add(Eviction(time=float(pid), worker_id=f"w{pid}", pid=pid, kind="died", reason="x"))
    kept = log.recent()
    assert [e.pid for e in kept] == list(reversed(pids))[:limit]


async def test_workers_that_fail_to_start_are_recorded_once_each(tmp_path) -> None:
    async with Pool(
        "tests.workers.bad:dies_after_first_start",
        size=1,
        max_restarts=1,
        restart_backoff=0.01,
        env={"CORRAL_TEST_MARKER": str(tmp_path / "started-once")},
    ) as pool:
        first = pool.workers[0]
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("die")
        with pytest.raises(corral.PoolFailed):
            await pool.wait_ready(timeout=20)
        status = pool.status()
    assert status.state == "failed"
    *failures, died = status.evictions
    assert (died.worker_id, died.pid, died.kind) == (first.id, first.pid, "died")
    assert len(failures) == status.stats.failed_starts >= 2
    assert len({e.worker_id for e in failures}) == len(failures)
    assert all(e.kind == "failed_to_start" and e.pid is None for e in failures)
    assert all("exited during start-up (exit code 9)" in e.reason for e in failures)
