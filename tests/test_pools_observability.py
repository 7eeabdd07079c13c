"""A Pools front seen from outside: Prometheus metrics, OTel spans, status data and series."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from corral import BreakerConfig, Pool, Pools, WorkerCrashed, Workload
from corral.otel import instrument, uninstrument
from corral.prometheus import PoolsCollector

TARGET = "tests.workers.basic:app"


def front() -> Pools:
    return Pools(
        Pool(TARGET, size=1, name="a"),
        Pool(TARGET, size=1, name="b"),
        workloads={"main": Workload(["a", "b"]), "only_a": ["a"]},
        breaker=BreakerConfig(min_calls=1, cooldown=30),
    )


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[(name, frozenset(labels.items()))]


async def open_breaker_of_a(pools: Pools) -> None:
    with pytest.raises(WorkerCrashed):
        await pools.call("exit_now", workload="only_a")


async def test_prometheus_shows_routing_breakers_and_the_pools() -> None:
    async with front() as pools:
        registry = CollectorRegistry()
        registry.register(PoolsCollector(pools))
        await open_breaker_of_a(pools)
        await pools.call("add", 1, 2, workload="main")  # falls back past a's open breaker
        found = samples(registry)
        assert value(found, "corral_breaker_state", pool="a", state="open") == 1
        assert value(found, "corral_breaker_state", pool="b", state="closed") == 1
        assert (
            value(found, "corral_breaker_transitions_total", pool="a", transition="closed->open")
            == 1
        )
        assert value(found, "corral_route_circuit_open_total", pool="a") == 1
        assert value(found, "corral_route_fallbacks_total", pool="a") == 1
        assert value(found, "corral_route_served_total", pool="b") == 1
        assert value(found, "corral_route_failures_total", pool="a") == 1
        assert value(found, "corral_workload_calls_total", workload="main") == 1
        assert value(found, "corral_route_retries_total", pool="a", result="denied") == 0
        # the pools' own metrics come along
        assert value(found, "corral_calls_total", pool="b", outcome="ok") == 1

        # and a scrape from another thread reads them on the front's loop
        scraped = await asyncio.to_thread(samples, registry)
        assert value(scraped, "corral_breaker_state", pool="a", state="open") == 1


def test_the_collector_wants_a_front() -> None:
    with pytest.raises(TypeError, match=r"corral\.Pools"):
        PoolsCollector(Pool(TARGET, size=1))  # type: ignore[arg-type]


async def test_a_routed_call_gets_a_span_with_the_routing_decision() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with instrument(front(), tracer_provider=provider) as pools:
        await open_breaker_of_a(pools)
        exporter.clear()
        await pools.call("add", 1, 2, workload="main")
        spans = {s.name: s for s in exporter.get_finished_spans()}
        route = spans["corral.route add"]
        client = spans["corral.call add"]
        assert route.kind is SpanKind.INTERNAL
        assert route.attributes is not None
        assert route.attributes["corral.route.workload"] == "main"
        assert route.attributes["corral.route.pool"] == "b"
        assert route.attributes["corral.route.fallbacks"] == 1
        assert route.attributes["corral.route.tried"] == "a:CircuitOpen"
        assert route.attributes["corral.route.breaker"] == "closed"
        assert client.parent is not None and client.parent.span_id == route.context.span_id
        uninstrument(pools)
        exporter.clear()
        await pools.call("add", 1, 2, workload="main")
        assert exporter.get_finished_spans() == ()


async def test_status_has_a_row_per_pool_its_breaker_history_and_a_series() -> None:
    async with front() as pools:
        await open_breaker_of_a(pools)
        pools.sample()
        await pools.call("add", 1, 2, workload="main")
        pools.sample()
        status = pools.status()
        rows = {row["name"]: row for row in status["pools"]}
        assert set(rows) == {"a", "b"}
        assert rows["a"]["breaker"] == "open"
        history = rows["a"]["breakers"][0]["history"]
        assert [(h["source"], h["target"]) for h in history] == [("closed", "open")]
        assert history[0]["reason"] == "1 of 1 calls failed"
        assert [m["label"] for m in rows["a"]["markers"]][:1] == ["closed->open"]
        assert rows["b"]["series"][-1]["calls"] > 0  # calls per second since the last point
        assert status["workloads"][0] == {
            "name": "main",
            "pools": ["a", "b"],
            "idempotent": False,
            "retries": 0,
            "calls": 1,
            "exhausted": 0,
            "default": True,
        }
        # the death of a's worker shows on its chart as an eviction marker
        await pools["a"].wait_ready(timeout=30)
        pools.sample()
        kinds = {m["kind"] for m in pools.status()["pools"][0]["markers"]}
        assert kinds == {"breaker", "eviction"}
