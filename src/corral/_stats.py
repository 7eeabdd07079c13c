"""PoolStats: a frozen snapshot of a pool, for dashboards, logs and tests.

Owns: the names and meaning of the pool's counters. Must not touch: the pool;
the pool builds a snapshot from its workers' states when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PoolStats"]


@dataclass(frozen=True, kw_only=True)
class PoolStats:
    """What the pool looked like at one moment."""

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
    closed: bool
    calls_ok: int
    calls_failed: dict[str, int] = field(default_factory=dict)  #: by error type

    @property
    def live(self) -> int:
        """Workers with a process: starting, idle, busy, draining or stopping."""
        return self.starting + self.idle + self.busy + self.draining + self.stopping

    @property
    def ready(self) -> int:
        """Workers that take calls now."""
        return self.idle + self.busy
