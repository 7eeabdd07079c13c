"""Observability: the structlog events of every lifecycle step, and ``pool.stats()``.

Events are captured with ``structlog.testing.capture_logs`` (corral never
configures structlog; its loggers read the configuration in force at each call).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

import corral
from corral import LatencyHistogram, Pool
from corral._stats import LATENCY_BOUNDS, LatencyRecorder

TARGET = "tests.workers.observed:app"


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def one(logs: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    found = [e for e in events(logs, name) if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {name} {match}, got {found}"
    return found[0]


async def wait_for_event(pool: Pool, logs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Wait, woken by every change of the pool, until ``name`` was logged."""
    assert await pool._wait_until(lambda: bool(events(logs, name)), 10), f"no {name}"
    return events(logs, name)[0]


# --- lifecycle events ------------------------------------------------------------


async def test_worker_started_and_ready_carry_pool_worker_id_and_pid() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1, name="obs") as pool:
            worker = pool.workers[0]
            started = one(logs, "worker.started", worker_id=worker.id)
            ready = one(logs, "worker.ready", worker_id=worker.id)
    assert started["pool"] == "obs"
    assert started["shepherd_pid"] > 0
    assert ready["pool"] == "obs"
    assert ready["pid"] == worker.pid


async def test_worker_exit_is_logged_with_its_exit_code() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1) as pool:
            worker = pool.workers[0]
            with pytest.raises(corral.WorkerCrashed):
                await pool.call("exit_now", 3)
            exited = await wait_for_event(pool, logs, "worker.exited")
    assert exited["worker_id"] == worker.id
    assert exited["pid"] == worker.pid
    assert exited["exit_code"] == 3
    assert exited["signal"] is None
    assert exited["log_level"] == "warning"


async def test_worker_killed_by_a_signal_is_logged_with_the_signal() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1) as pool:
            worker = pool.workers[0]
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            exited = await wait_for_event(pool, logs, "worker.exited")
    assert exited["worker_id"] == worker.id
    assert exited["exit_code"] == -9
    assert exited["signal"] == "SIGKILL"


async def test_recycling_is_logged_with_its_reason() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1, max_requests=1, recycle_jitter=0) as pool:
            worker = pool.workers[0]
            await pool.call("add", 1, 2)
            recycled = await wait_for_event(pool, logs, "worker.recycling")
    assert recycled["worker_id"] == worker.id
    assert recycled["pid"] == worker.pid
    assert "max_requests" in recycled["reason"]


async def test_eviction_is_logged_with_its_reason() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1, cancel_grace=0.2) as pool:
            worker = pool.workers[0]
            with pytest.raises(corral.CallTimeout):
                await pool.call("sleep", 3.0, timeout=0.2)  # ignores the cancel
            evicted = await wait_for_event(pool, logs, "worker.evicted")
    assert evicted["worker_id"] == worker.id
    assert evicted["pid"] == worker.pid
    assert "cancel_grace" in evicted["reason"]


async def test_a_new_session_is_logged_once_with_its_worker() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=2, name="obs") as pool:
            home = await pool.call("whoami", session="user-1")
            await pool.call("add", 1, 2, session="user-1")
    opened = one(logs, "session.opened")
    assert opened["session"] == "user-1"
    assert opened["pool"] == "obs"
    assert opened["worker_id"] == home["worker_id"]
    assert opened["pid"] == home["pid"]


async def test_a_lost_session_is_logged_with_its_worker() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1) as pool:
            home = await pool.call("whoami", session="user-1")
            with pytest.raises(corral.SessionLost):
                await pool.call("exit_now", 1, session="user-1")
            lost = await wait_for_event(pool, logs, "session.lost")
    assert lost["session"] == "user-1"
    assert lost["worker_id"] == home["worker_id"]
    assert lost["pid"] == home["pid"]


async def test_an_expired_session_is_logged_with_its_worker() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1, session_ttl=0.1, heartbeat_interval=0.05) as pool:
            home = await pool.call("whoami", session="user-1")
            expired = await wait_for_event(pool, logs, "session.expired")
    assert expired["session"] == "user-1"
    assert expired["worker_id"] == home["worker_id"]
    assert expired["pid"] == home["pid"]


async def test_a_failed_call_is_logged_with_its_error_type_and_ids() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1, name="obs") as pool:
            with pytest.raises(corral.RemoteError) as caught:
                await pool.call("fail", "boom", session="s")
    failed = one(logs, "call.failed")
    assert failed["error_type"] == "RemoteError"
    assert failed["remote_type"] == "ValueError"
    assert failed["method"] == "fail"
    assert failed["call_id"] == caught.value.call_id is not None
    assert failed["worker_id"] == caught.value.worker_id is not None
    assert failed["pid"] == caught.value.pid is not None
    assert failed["session"] == "s"
    assert failed["pool"] == "obs"
    assert failed["log_level"] == "info"  # the handler's own error: the worker is fine


async def test_a_timed_out_call_is_logged_as_a_warning() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1) as pool:
            with pytest.raises(corral.CallTimeout):
                await pool.call("wait_cancelled", 5.0, timeout=0.1)
    failed = one(logs, "call.failed")
    assert failed["error_type"] == "CallTimeout"
    assert failed["log_level"] == "warning"


async def test_failed_streams_and_checkout_calls_are_logged_too() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1) as pool:
            with pytest.raises(corral.MethodNotFound):
                async for _ in pool.stream("no_such_stream"):
                    pass
            async with pool.checkout() as lease:
                with pytest.raises(corral.RemoteError):
                    await lease.call("fail", "x")
    assert [e["method"] for e in events(logs, "call.failed")] == ["no_such_stream", "fail"]
    assert [e["error_type"] for e in events(logs, "call.failed")] == [
        "MethodNotFound",
        "RemoteError",
    ]


async def test_worker_logs_reach_the_parent_with_the_worker_id() -> None:
    with capture_logs() as logs:
        async with Pool(TARGET, size=1) as pool:
            worker = pool.workers[0]
            await pool.call("log_with_structlog", "hello from the worker")

            def logged() -> list[dict[str, Any]]:
                return [
                    e
                    for e in events(logs, "worker.stderr")
                    if "myapp.said" in e["line"] and "hello from the worker" in e["line"]
                ]

            assert await pool._wait_until(lambda: bool(logged()), 10)
    line = logged()[0]
    assert line["worker_id"] == worker.id
    assert line["pid"] == worker.pid


async def test_the_library_never_configures_logging() -> None:
    structlog_before = structlog.get_config()
    configured_before = structlog.is_configured()
    root = logging.getLogger()
    handlers_before, level_before = list(root.handlers), root.level
    async with Pool(TARGET, size=1) as pool:
        await pool.call("add", 1, 2)
        with pytest.raises(corral.RemoteError):
            await pool.call("fail", "x")
    assert structlog.get_config() == structlog_before
    assert structlog.is_configured() == configured_before
    assert root.handlers == handlers_before and root.level == level_before


# --- the latency histogram ---------------------------------------------------------


def test_latency_bounds_are_log_spaced_and_increasing() -> None:
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BOUNDS)]
    assert all(2 <= r <= 2.5 + 1e-9 for r in ratios)
    assert LATENCY_BOUNDS[0] <= 50e-6 and LATENCY_BOUNDS[-1] >= 60


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=50))
def test_each_latency_lands_in_the_bucket_whose_bounds_hold_it(samples: list[float]) -> None:
    recorder = LatencyRecorder()
    for seconds in samples:
        before = list(recorder.counts)
        recorder.record(seconds)
        (index,) = [
            i for i, (a, b) in enumerate(zip(before, recorder.counts, strict=True)) if a != b
        ]
        low = 0.0 if index == 0 else LATENCY_BOUNDS[index - 1]
        high = LATENCY_BOUNDS[index] if index < len(LATENCY_BOUNDS) else float("inf")
        assert low < seconds <= high or (index == 0 and seconds == 0)
    histogram = recorder.snapshot()
    assert histogram.count == len(samples) == sum(histogram.counts)
    assert histogram.sum == pytest.approx(sum(samples))
    cumulative = histogram.cumulative()
    assert cumulative[-1] == len(samples)
    assert all(a <= b for a, b in itertools.pairwise(cumulative))


@given(
    st.lists(st.floats(min_value=1e-6, max_value=50, allow_nan=False), min_size=1, max_size=50),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_a_quantile_estimate_is_the_bound_above_the_true_quantile(
    samples: list[float], q: float
) -> None:
    recorder = LatencyRecorder()
    for seconds in samples:
        recorder.record(seconds)
    estimate = recorder.snapshot().quantile(q)
    assert estimate is not None
    ordered = sorted(samples)
    rank = max(1, -(-q * len(ordered) // 1))  # ceil(q * n), at least 1
    true = ordered[int(rank) - 1]
    assert true <= estimate <= max(LATENCY_BOUNDS[0], true * 2.5 + 1e-12)


def test_an_empty_histogram_has_no_quantile() -> None:
    histogram = LatencyRecorder().snapshot()
    assert histogram.count == 0
    assert histogram.quantile(0.5) is None


# --- stats under real calls ----------------------------------------------------------


async def test_the_histogram_counts_every_call_that_ended() -> None:
    async with Pool(TARGET, size=2) as pool:
        for i in range(20):
            assert await pool.call("add", i, 1) == i + 1
        for _ in range(3):
            with pytest.raises(corral.RemoteError):
                await pool.call("fail", "x")
        await pool.call("sleep", 0.06)
        stats = pool.stats()
    latency = stats.latency
    assert isinstance(latency, LatencyHistogram)
    assert stats.calls_ok == 21
    assert stats.calls_failed == {"RemoteError": 3}
    assert latency.count == stats.calls_ok + sum(stats.calls_failed.values()) == 24
    assert latency.bounds == LATENCY_BOUNDS
    assert latency.sum >= 0.06
    # the 60 ms call is in a bucket whose upper bound is at least 60 ms
    slow = [i for i, n in enumerate(latency.counts) if n and i < len(latency.bounds)]
    assert latency.bounds[max(slow)] >= 0.06
    assert latency.quantile(1.0) >= 0.06


async def test_streams_count_by_outcome_but_stay_out_of_the_histogram() -> None:
    async with Pool(TARGET, size=1) as pool:
        assert [x async for x in pool.stream("count", 3)] == [0, 1, 2]
        async with pool.stream("count", 100) as items:
            async for _ in items:
                break  # stopped early by its consumer
        stats = pool.stats()
    assert stats.calls_ok == 1
    assert stats.calls_cancelled == 1
    assert stats.latency.count == 0


async def test_a_cancelled_call_is_counted_as_cancelled_not_failed() -> None:
    async with Pool(TARGET, size=1) as pool:
        worker = pool.workers[0]
        task = asyncio.ensure_future(pool.call("announce_then_wait", 5.0))
        assert await pool._wait_until(lambda: "waiting in call" in worker.stderr_tail, 10)
        assert pool.stats().inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.wait_idle(timeout=10)
        stats = pool.stats()
    assert stats.calls_cancelled == 1
    assert stats.calls_failed == {}
    assert stats.calls_ok == 0
    assert stats.latency.count == 0


async def test_stats_while_calls_wait_add_up() -> None:
    async with Pool(TARGET, size=1, max_concurrency=1) as pool:
        calls = [asyncio.ensure_future(pool.call("wait_cancelled", 5.0)) for _ in range(3)]
        assert await pool._wait_until(lambda: pool.stats().waiting == 2, 10)
        stats = pool.stats()
        assert (stats.busy, stats.idle, stats.inflight, stats.waiting) == (1, 0, 1, 2)
        assert stats.live == stats.size == 1
        text = repr(pool)
        assert "\n" not in text
        assert "1 busy" in text and "2 waiting" in text
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await pool.wait_idle(timeout=10)
        after = pool.stats()
    assert (after.inflight, after.waiting, after.busy, after.idle) == (0, 0, 0, 1)
    assert after.calls_cancelled == 3


async def test_a_snapshot_is_frozen_and_does_not_follow_the_pool() -> None:
    async with Pool(TARGET, size=1) as pool:
        await pool.call("add", 1, 2, session="s")
        before = pool.stats()
        await pool.call("add", 1, 2)
        await pool.close_session("s")
        after = pool.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.calls_ok = 5  # type: ignore[misc]
    assert (before.calls_ok, before.sessions, before.latency.count) == (1, 1, 1)
    assert (after.calls_ok, after.sessions, after.latency.count) == (2, 0, 2)


async def test_restarts_are_counted_when_a_worker_is_replaced() -> None:
    async with Pool(TARGET, size=1) as pool:
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        await pool.wait_ready(timeout=30)
        assert await pool.call("add", 1, 1) == 2
        stats = pool.stats()
    assert stats.restarts == 1
    assert stats.calls_failed == {"WorkerCrashed": 1}
