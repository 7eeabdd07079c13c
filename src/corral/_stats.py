"""PoolStats: a frozen snapshot of a pool, for dashboards, logs and tests.

Owns: the names and meaning of the pool's counters, and the call-latency
histogram (its fixed buckets, the recorder the pool feeds, and its snapshot).
Must not touch: the pool; the pool builds a snapshot from its workers' states
when asked.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

__all__ = ["LATENCY_BOUNDS", "LatencyHistogram", "LatencyRecorder", "PoolStats"]

#: Upper bounds (seconds, inclusive) of the latency buckets: a 1-2.5-5 series from
#: 25 µs to 100 s, so each bucket is 2 to 2.5 times as wide as the one below it.
#: A last, unbounded bucket holds anything slower.
LATENCY_BOUNDS: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
)  # fmt: skip


class LatencyRecorder:
    """The pool's running latency histogram: one bisect and two additions per call.

    Not a snapshot: the pool owns one and ``snapshot()`` copies it.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.sum = 0.0

    def record(self, seconds: float) -> None:
        """Count one call that took ``seconds``."""
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> LatencyHistogram:
        """A frozen copy of the counts so far."""
        counts = tuple(self.counts)
        return LatencyHistogram(counts=counts, count=sum(counts), sum=self.sum)


@dataclass(frozen=True, kw_only=True)
class LatencyHistogram:
    """How long calls took, from ``call()`` to its result or error, in fixed buckets.

    ``counts[i]`` is the number of calls that took more than ``bounds[i - 1]``
    and at most ``bounds[i]`` seconds; the last count (one more than there are
    bounds) is the calls slower than ``bounds[-1]``. Every ``pool.call()`` and
    ``WorkerLease.call()`` that returned or raised a corral error is counted;
    streams and cancelled calls are not.
    """

    bounds: tuple[float, ...] = LATENCY_BOUNDS  #: upper bounds in seconds
    counts: tuple[int, ...]  #: calls per bucket (not cumulative); one more than bounds
    count: int  #: calls counted
    sum: float  #: their total time, in seconds

    def cumulative(self) -> tuple[int, ...]:
        """Calls at or under each bound, then the total: Prometheus's ``le`` buckets."""
        running = 0
        out = []
        for n in self.counts:
            running += n
            out.append(running)
        return tuple(out)

    def quantile(self, q: float) -> float | None:
        """An upper estimate of the ``q`` quantile (0 < q <= 1): its bucket's bound.

        The true quantile is at most the value returned, and more than the bound
        of the bucket below it. None when nothing was counted; ``inf`` when it
        falls in the last, unbounded bucket.
        """
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q!r}")
        if not self.count:
            return None
        rank = q * self.count
        running = 0
        for i, n in enumerate(self.counts):
            running += n
            if running >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")  # pragma: no cover - rank <= count always reaches the end


@dataclass(frozen=True, kw_only=True)
class PoolStats:
    """What the pool looked like at one moment. Take it with ``pool.stats()``."""

    size: int  #: target number of workers
    starting: int  #: spawned, not yet ready
    idle: int  #: ready, nothing in flight
    busy: int  #: calls in flight or leased by a checkout
    draining: int  #: finishing their calls before they stop
    stopping: int  #: being stopped or evicted
    leased: int  #: held by a checkout block
    inflight: int  #: calls in flight over all workers
    waiting: int  #: callers waiting for a worker
    sessions: int  #: sessions pinned to live workers
    restarts: int  #: workers started to replace one that died or was recycled
    recycles: int  #: workers retired by max_requests, max_lifetime or max_memory
    failed_starts: int  #: workers that never became ready
    failed: bool  #: too many failed starts and no live worker: calls fail fast
    closed: bool  #: the pool is closing or closed
    calls_ok: int  #: calls and streams that ended with their result
    calls_failed: dict[str, int] = field(default_factory=dict)  #: by error type
    calls_cancelled: int = 0  #: calls and streams stopped by their caller
    #: failed starts that were not the worker's own (``PlacementError``: no room,
    #: a node lost, a flooded listener); counted in ``failed_starts`` too, never
    #: against the restart budget
    placement_failures: int = 0
    latency: LatencyHistogram = field(
        default_factory=lambda: LatencyRecorder().snapshot()
    )  #: how long calls took

    @property
    def live(self) -> int:
        """Workers with a process: starting, idle, busy, draining or stopping."""
        return self.starting + self.idle + self.busy + self.draining + self.stopping

    @property
    def ready(self) -> int:
        """Workers that take calls now."""
        return self.idle + self.busy

    @property
    def calls(self) -> int:
        """Calls and streams that ended, whatever the outcome."""
        return self.calls_ok + sum(self.calls_failed.values()) + self.calls_cancelled
