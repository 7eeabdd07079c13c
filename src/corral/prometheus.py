"""A Prometheus collector for corral pools: ``pool.stats()`` at every scrape.

    from prometheus_client import REGISTRY
    from corral.prometheus import PoolCollector

    REGISTRY.register(PoolCollector(pool))
    REGISTRY.register(PoolsCollector(pools))   # a Pools front: its pools and its routing

Owns: the metric names, their labels and how each is read from a PoolStats.
Must not touch: the pool beyond ``stats()``. Importing this module imports
``prometheus-client`` (the ``corral[prometheus]`` extra); corral itself never
does. Nothing is counted twice: the pool keeps its counters, and the collector
only reads a snapshot when scraped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._pool import Pool
from ._pools import Pools, PoolsStats
from ._stats import PoolStats

__all__ = ["PoolCollector", "PoolsCollector"]

_BREAKER_STATES = ("closed", "open", "half_open")

_STATES = ("starting", "idle", "busy", "draining", "stopping")


class PoolCollector(Collector):
    """Exposes the stats of one or more pools, each labelled with its ``pool`` name.

    Register one collector per registry for all the pools of a process (a
    registry refuses two collectors that expose the same metric names).

    Metrics (``corral_`` is the namespace):

    - gauges: ``pool_size``, ``workers{state}`` (starting, idle, busy, draining,
      stopping), ``leased_workers``, ``inflight_calls``, ``waiting_callers``,
      ``sessions``, ``pool_failed`` (0 or 1);
    - counters: ``calls_total{outcome}`` (ok, error, cancelled),
      ``call_errors_total{type}`` (the corral error class),
      ``worker_restarts_total``, ``worker_recycles_total``,
      ``worker_failed_starts_total``, ``worker_placement_failures_total`` (the
      failed starts that were the placement's: they never use the restart budget);
    - histogram: ``call_duration_seconds``, in the pool's fixed latency buckets.

    A scrape from another thread (``prometheus_client.start_http_server``)
    takes each snapshot on the pool's event loop, waiting up to ``timeout``
    seconds for it; a scrape on that loop takes it directly.
    """

    def __init__(self, *pools: Pool, namespace: str = "corral", timeout: float = 5.0) -> None:
        """Collect from ``pools``.

        Raises:
            TypeError: no pool was given, or something else than a ``corral.Pool``.
        """
        if not pools:
            raise TypeError("PoolCollector() needs at least one corral.Pool")
        for pool in pools:
            if not isinstance(pool, Pool):
                raise TypeError(f"PoolCollector() takes corral.Pool, got {type(pool).__qualname__}")
        self._pools = pools
        self._prefix = f"{namespace}_" if namespace else ""
        self._timeout = timeout

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (no pool is read)."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        """One sample per pool for every metric."""
        return self._families([(pool.name, self._snapshot(pool)) for pool in self._pools])

    def _snapshot(self, pool: Pool) -> PoolStats:
        """``pool.stats()``, taken on the pool's loop when called from another thread."""
        loop = pool._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return pool.stats()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return pool.stats()
        result: concurrent.futures.Future[PoolStats] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(pool.stats())
            except Exception as exc:  # noqa: BLE001 - handed to the scraping thread, raised there
                result.set_exception(exc)

        loop.call_soon_threadsafe(take)
        try:
            return result.result(self._timeout)
        except TimeoutError:
            raise TimeoutError(
                f"the event loop of pool {pool.name} did not answer within {self._timeout}s "
                "(blocked?): no stats for this scrape"
            ) from None

    def _families(self, snapshots: list[tuple[str, PoolStats]]) -> Iterator[Metric]:
        p = self._prefix

        def gauge(name: str, doc: str, read: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(p + name, doc, labels=["pool"])
            for pool, stats in snapshots:
                family.add_metric([pool], float(getattr(stats, read)))
            return family

        def counter(name: str, doc: str, read: str) -> CounterMetricFamily:
            family = CounterMetricFamily(p + name, doc, labels=["pool"])
            for pool, stats in snapshots:
                family.add_metric([pool], float(getattr(stats, read)))
            return family

        yield gauge("pool_size", "Workers the pool wants now.", "size")
        workers = GaugeMetricFamily(p + "workers", "Workers by state.", labels=["pool", "state"])
        for pool, stats in snapshots:
            for state in _STATES:
                workers.add_metric([pool, state], float(getattr(stats, state)))
        yield workers
        yield gauge("leased_workers", "Workers held by a checkout block.", "leased")
        yield gauge("inflight_calls", "Calls in flight over all workers.", "inflight")
        yield gauge("waiting_callers", "Callers waiting for a worker.", "waiting")
        yield gauge("sessions", "Sessions pinned to live workers.", "sessions")
        yield gauge("pool_failed", "1 while workers keep failing to start.", "failed")

        calls = CounterMetricFamily(
            p + "calls", "Calls and streams that ended, by outcome.", labels=["pool", "outcome"]
        )
        errors = CounterMetricFamily(
            p + "call_errors",
            "Calls and streams that failed, by error type.",
            labels=["pool", "type"],
        )
        for pool, stats in snapshots:
            calls.add_metric([pool, "ok"], float(stats.calls_ok))
            calls.add_metric([pool, "error"], float(sum(stats.calls_failed.values())))
            calls.add_metric([pool, "cancelled"], float(stats.calls_cancelled))
            for error_type, n in sorted(stats.calls_failed.items()):
                errors.add_metric([pool, error_type], float(n))
        yield calls
        yield errors
        yield counter("worker_restarts", "Workers started to replace one that ended.", "restarts")
        yield counter("worker_recycles", "Workers retired by a recycling limit.", "recycles")
        yield counter("worker_failed_starts", "Workers that never became ready.", "failed_starts")
        yield counter(
            "worker_placement_failures",
            "Failed starts that were the placement's (no room, node lost), not the worker's; "
            "a subset of worker_failed_starts that never uses the restart budget.",
            "placement_failures",
        )

        latency = HistogramMetricFamily(
            p + "call_duration_seconds",
            "Time from call() to its result or error.",
            labels=["pool"],
        )
        for pool, stats in snapshots:
            histogram = stats.latency
            cumulative = histogram.cumulative()
            buckets = [
                (floatToGoString(bound), float(n))  # type: ignore[no-untyped-call]
                for bound, n in zip(histogram.bounds, cumulative, strict=False)
            ]
            buckets.append(("+Inf", float(histogram.count)))
            latency.add_metric([pool], buckets, sum_value=histogram.sum)
        yield latency


class PoolsCollector(PoolCollector):
    """Exposes a ``corral.Pools`` front: every metric of its pools, plus its routing.

    Routing metrics (``corral_`` is the namespace):

    - counters by ``pool``: ``route_attempts_total`` (calls sent to the pool),
      ``route_served_total``, ``route_failures_total`` (the pool's fault, as its
      breaker counts them), ``route_circuit_open_total`` (refused by its open
      breaker), ``route_fallbacks_total`` (calls that left it for the next pool),
      ``route_retries_total{result}`` (``taken``, ``denied`` by the budget),
      ``breaker_transitions_total{transition}`` (``closed->open``...);
    - gauge ``breaker_state{pool, state}``: 1 for the pool's current state
      (``closed``, ``open``, ``half_open``; with per-method breakers, the worst);
    - counters by ``workload``: ``workload_calls_total``,
      ``workload_exhausted_total`` (every pool of the chain refused or failed).
    """

    def __init__(self, pools: Pools, *, namespace: str = "corral", timeout: float = 5.0) -> None:
        """Collect from the front ``pools``.

        Raises:
            TypeError: ``pools`` is not a ``corral.Pools``.
        """
        if not isinstance(pools, Pools):
            raise TypeError(
                f"PoolsCollector() takes a corral.Pools, got {type(pools).__qualname__}"
            )
        super().__init__(*pools.pools.values(), namespace=namespace, timeout=timeout)
        self._front = pools

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (nothing is read)."""
        yield from self._families([])
        yield from self._route_families(None)

    def collect(self) -> Iterator[Metric]:
        """The pools' metrics, then the front's."""
        front = self._on_loop(self._front._loop, self._front.stats)
        yield from self._families(list(front.pools.items()))
        yield from self._route_families(front)

    def _on_loop(
        self, loop: asyncio.AbstractEventLoop | None, read: Callable[[], PoolsStats]
    ) -> PoolsStats:
        if loop is None or loop.is_closed() or not loop.is_running():
            return read()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return read()
        result: concurrent.futures.Future[PoolsStats] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(read())
            except Exception as exc:  # noqa: BLE001 - handed to the scraping thread, raised there
                result.set_exception(exc)

        loop.call_soon_threadsafe(take)
        try:
            return result.result(self._timeout)
        except TimeoutError:
            raise TimeoutError(
                f"the event loop of the Pools front did not answer within {self._timeout}s "
                "(blocked?): no stats for this scrape"
            ) from None

    def _route_families(self, front: PoolsStats | None) -> Iterator[Metric]:
        p = self._prefix
        routes = front.routes if front is not None else {}

        def by_pool(name: str, doc: str, read: str) -> CounterMetricFamily:
            family = CounterMetricFamily(p + name, doc, labels=["pool"])
            for pool, stats in routes.items():
                family.add_metric([pool], float(getattr(stats, read)))
            return family

        yield by_pool("route_attempts", "Calls the front sent to the pool.", "routed")
        yield by_pool("route_served", "Calls the pool answered.", "served")
        yield by_pool("route_failures", "Calls the pool failed by its own fault.", "failed")
        yield by_pool(
            "route_circuit_open", "Calls refused by the pool's open breaker.", "circuit_open"
        )
        yield by_pool(
            "route_fallbacks", "Calls that left the pool for the next of their chain.", "fallbacks"
        )
        retries = CounterMetricFamily(
            p + "route_retries",
            "Retries, taken or denied by the budget.",
            labels=["pool", "result"],
        )
        transitions = CounterMetricFamily(
            p + "breaker_transitions",
            "Circuit breaker transitions.",
            labels=["pool", "transition"],
        )
        state = GaugeMetricFamily(
            p + "breaker_state", "1 for the breaker's current state.", labels=["pool", "state"]
        )
        for pool, stats in routes.items():
            retries.add_metric([pool, "taken"], float(stats.retries))
            retries.add_metric([pool, "denied"], float(stats.retries_denied))
            for transition, n in sorted(stats.transitions.items()):
                transitions.add_metric([pool, transition], float(n))
            for name in _BREAKER_STATES:
                state.add_metric([pool, name], 1.0 if stats.breaker == name else 0.0)
        yield retries
        yield transitions
        yield state
        calls = CounterMetricFamily(
            p + "workload_calls", "Calls routed, by workload.", labels=["workload"]
        )
        exhausted = CounterMetricFamily(
            p + "workload_exhausted",
            "Calls every pool of the workload's chain refused or failed.",
            labels=["workload"],
        )
        if front is not None:
            for workload, n in front.workloads.items():
                calls.add_metric([workload], float(n))
            for workload, n in front.exhausted.items():
                exhausted.add_metric([workload], float(n))
        yield calls
        yield exhausted
