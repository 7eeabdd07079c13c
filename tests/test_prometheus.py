"""Prometheus: ``corral.prometheus.PoolCollector`` exposes ``pool.stats()``.

Each test registers the collector in a fresh CollectorRegistry and reads the
exposition text back with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import corral
from corral import Pool
from corral.prometheus import PoolCollector

TARGET = "tests.workers.observed:app"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry))


def parse(text: bytes) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def registry_with(*pools: Pool) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PoolCollector(*pools))
    return registry


async def test_gauges_and_counters_follow_the_stats() -> None:
    async with Pool(TARGET, size=2, name="p1") as pool:
        registry = registry_with(pool)
        for i in range(5):
            await pool.call("add", i, 1)
        await pool.call("add", 1, 1, session="s")
        with pytest.raises(corral.RemoteError):
            await pool.call("fail", "x")
        assert [x async for x in pool.stream("count", 2)] == [0, 1]
        samples = scrape(registry)
        stats = pool.stats()
    assert value(samples, "corral_pool_size", pool="p1") == 2
    assert value(samples, "corral_workers", pool="p1", state="idle") == stats.idle == 2
    assert value(samples, "corral_workers", pool="p1", state="busy") == 0
    assert value(samples, "corral_workers", pool="p1", state="starting") == 0
    assert value(samples, "corral_sessions", pool="p1") == 1
    assert value(samples, "corral_waiting_callers", pool="p1") == 0
    assert value(samples, "corral_inflight_calls", pool="p1") == 0
    assert value(samples, "corral_pool_failed", pool="p1") == 0
    assert value(samples, "corral_calls_total", pool="p1", outcome="ok") == 7
    assert value(samples, "corral_calls_total", pool="p1", outcome="error") == 1
    assert value(samples, "corral_calls_total", pool="p1", outcome="cancelled") == 0
    assert value(samples, "corral_call_errors_total", pool="p1", type="RemoteError") == 1
    assert value(samples, "corral_worker_restarts_total", pool="p1") == 0


async def test_the_latency_histogram_has_the_pools_buckets() -> None:
    async with Pool(TARGET, size=1, name="p1") as pool:
        registry = registry_with(pool)
        for i in range(4):
            await pool.call("add", i, 1)
        await pool.call("sleep", 0.03)
        samples = scrape(registry)
        latency = pool.stats().latency
    name = "corral_call_duration_seconds"
    assert value(samples, f"{name}_count", pool="p1") == latency.count == 5
    assert value(samples, f"{name}_sum", pool="p1") == pytest.approx(latency.sum)
    assert value(samples, f"{name}_bucket", pool="p1", le="+Inf") == 5
    cumulative = latency.cumulative()
    for bound, expected in zip(latency.bounds, cumulative, strict=False):
        assert value(samples, f"{name}_bucket", pool="p1", le=str(bound)) == expected
    assert value(samples, f"{name}_bucket", pool="p1", le="0.025") <= 4  # the 30 ms call


async def test_waiting_callers_and_busy_workers_show_while_calls_wait() -> None:
    async with Pool(TARGET, size=1, max_concurrency=1, name="p1") as pool:
        registry = registry_with(pool)
        calls = [asyncio.ensure_future(pool.call("wait_cancelled", 5.0)) for _ in range(3)]
        assert await pool._wait_until(lambda: pool.stats().waiting == 2, 10)
        samples = scrape(registry)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await pool.wait_idle(timeout=10)
        after = scrape(registry)
    assert value(samples, "corral_waiting_callers", pool="p1") == 2
    assert value(samples, "corral_workers", pool="p1", state="busy") == 1
    assert value(samples, "corral_inflight_calls", pool="p1") == 1
    assert value(after, "corral_calls_total", pool="p1", outcome="cancelled") == 3


async def test_restarts_are_counted() -> None:
    async with Pool(TARGET, size=1, name="p1") as pool:
        registry = registry_with(pool)
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        await pool.wait_ready(timeout=30)
        samples = scrape(registry)
    assert value(samples, "corral_worker_restarts_total", pool="p1") == 1
    assert value(samples, "corral_call_errors_total", pool="p1", type="WorkerCrashed") == 1


async def test_a_scrape_from_another_thread_reads_the_stats_on_the_pools_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As with prometheus_client.start_http_server, which serves from a thread.
    async with Pool(TARGET, size=1, name="p1") as pool:
        registry = registry_with(pool)
        await pool.call("add", 1, 2)
        read_on: list[int] = []
        stats = pool.stats

        def spied() -> corral.PoolStats:
            read_on.append(threading.get_ident())
            return stats()

        monkeypatch.setattr(pool, "stats", spied)
        text = await asyncio.to_thread(generate_latest, registry)
    assert read_on == [threading.get_ident()]  # this thread runs the pool's loop
    assert value(parse(text), "corral_calls_total", pool="p1", outcome="ok") == 1


async def test_one_collector_serves_several_pools() -> None:
    async with Pool(TARGET, size=1, name="a") as a, Pool(TARGET, size=2, name="b") as b:
        registry = registry_with(a, b)
        await a.call("add", 1, 2)
        samples = scrape(registry)
    assert value(samples, "corral_pool_size", pool="a") == 1
    assert value(samples, "corral_pool_size", pool="b") == 2
    assert value(samples, "corral_calls_total", pool="a", outcome="ok") == 1
    assert value(samples, "corral_calls_total", pool="b", outcome="ok") == 0


def test_registering_before_the_pool_starts_reads_nothing_yet() -> None:
    pool = Pool(TARGET, size=3, name="later")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(pool))
    samples = scrape(registry)
    assert value(samples, "corral_pool_size", pool="later") == 3
    assert value(samples, "corral_workers", pool="later", state="idle") == 0


def test_a_collector_needs_a_pool() -> None:
    with pytest.raises(TypeError, match="at least one"):
        PoolCollector()
    not_a_pool: Any = "pool"
    with pytest.raises(TypeError, match=r"corral\.Pool"):
        PoolCollector(not_a_pool)
