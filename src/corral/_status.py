"""PoolStatus: a per-worker snapshot of a pool, for status pages and ``corral top``.

Owns: the snapshot types (``PoolStatus``, ``WorkerInfo``, ``QueueInfo``,
``Eviction``, ``NodeInfo``), their JSON form (``PoolStatus.to_dict``), the bounded log of
recent evictions, and how a worker's exit is classified for it. Must not touch:
the pool's decisions or the handles' state: it reads worker handles, never
changes them. ``PoolStats`` (``_stats.py``) stays the pool's counters; this
module only carries a copy of it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._errors import describe_exit
from ._stats import PoolStats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ._handle import WorkerHandle

__all__ = [
    "Eviction",
    "EvictionLog",
    "NodeInfo",
    "PoolStatus",
    "QueueInfo",
    "WorkerInfo",
    "build_status",
]

EvictionKind = Literal["evicted", "died", "recycled", "failed_to_start"]

EVICTIONS_KEPT = 50


@dataclass(frozen=True, kw_only=True)
class WorkerInfo:
    """One worker at the moment of the snapshot."""

    id: str  #: the worker's id in the pool (``pool1-w3``)
    pid: int | None  #: the worker process's pid; None until it said hello
    state: str  #: starting, ready, busy, draining, stopping or dead
    started_at: float  #: when it was launched, as a Unix time
    uptime: float  #: seconds since it was launched
    calls_served: int  #: calls it has finished
    inflight: int  #: calls in flight on it now (reserved slots included)
    sessions: int  #: sessions pinned to it
    leased: bool  #: held by a checkout block
    rss: int | None  #: resident memory in bytes; None unless asked for (or unknown)
    note: str | None  #: why it is draining or being stopped, or is due for recycling
    node_id: str | None = None  #: the node it runs on (Ray's node id); None for a local worker
    node_address: str | None = None  #: that node's address; None for a local worker


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """The pool's workers on one node: what that node's loss would take with it."""

    id: str  #: the node's id (Ray's node id, or the host name)
    address: str | None  #: the node's address
    workers: int  #: workers placed there, whatever their state
    ready: int  #: of which take calls now
    inflight: int  #: calls in flight there now: what its loss would fail
    sessions: int  #: sessions pinned there: what its loss would lose


@dataclass(frozen=True, kw_only=True)
class QueueInfo:
    """Callers waiting for a worker, by what they wait for."""

    calls: int  #: plain calls and streams
    checkouts: int  #: ``checkout()`` blocks without a session
    sessions: int  #: calls and checkouts waiting for the worker that holds their session

    @property
    def total(self) -> int:
        """Every waiting caller."""
        return self.calls + self.checkouts + self.sessions


@dataclass(frozen=True, kw_only=True)
class Eviction:
    """A worker that left the pool while it was open, and why.

    ``kind`` is ``"evicted"`` (the pool killed it: a missed heartbeat, an
    unacknowledged cancel, a protocol error...), ``"died"`` (it ended by itself
    or was killed from outside), ``"recycled"`` (drained and stopped by
    ``max_requests``, ``max_lifetime``, ``max_memory``, ``idle_timeout`` or
    ``reload()``) or ``"failed_to_start"``.
    """

    time: float  #: when, as a Unix time
    worker_id: str
    pid: int | None  #: None for a worker that never said hello
    kind: EvictionKind
    reason: str  #: the pool's reason, or how the process ended (``signal SIGKILL``)


class EvictionLog:
    """The last ``limit`` evictions, oldest dropped first."""

    def __init__(self, limit: int = EVICTIONS_KEPT) -> None:
        self._entries: collections.deque[Eviction] = collections.deque(maxlen=limit)

    def add(self, eviction: Eviction) -> None:
        """Record one eviction."""
        self._entries.append(eviction)

    def worker_left(self, worker: WorkerHandle) -> None:
        """Record a worker whose process ended while the pool was open."""
        kind: EvictionKind
        if worker.kill_reason is not None:
            kind, reason = "evicted", worker.kill_reason
        elif worker.recycle_reason is not None:
            kind, reason = "recycled", worker.recycle_reason
        else:
            kind, reason = "died", describe_exit(worker.exit_code)
        self.add(
            Eviction(
                time=time.time(), worker_id=worker.id, pid=worker.pid, kind=kind, reason=reason
            )
        )

    def start_failed(self, worker: WorkerHandle, message: str) -> None:
        """Record a worker that never became ready."""
        self.add(
            Eviction(
                time=time.time(),
                worker_id=worker.id,
                pid=worker.pid,
                kind="failed_to_start",
                reason=message,
            )
        )

    def recent(self) -> tuple[Eviction, ...]:
        """The evictions kept, newest first."""
        return tuple(reversed(self._entries))


@dataclass(frozen=True, kw_only=True)
class PoolStatus:
    """A pool at one moment, worker by worker: what a status page shows.

    ``Pool.status()`` builds it. ``stats`` is the pool's ``PoolStats`` taken at
    the same moment; ``to_dict()`` is the JSON form served by
    ``corral.asgi.status_app`` and read by ``corral top --url``.
    """

    name: str  #: the pool's name
    target: str  #: ``module:attr`` of the workers' app
    state: str  #: new, starting, open, failed, closing or closed
    taken_at: float  #: when the snapshot was taken, as a Unix time
    workers: tuple[WorkerInfo, ...]
    queue: QueueInfo
    evictions: tuple[Eviction, ...]  #: the most recent first
    stats: PoolStats
    #: placed workers by node (empty for a local pool), most workers first
    nodes: tuple[NodeInfo, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready builtins (the body of ``/status.json``)."""
        s = self.stats
        return {
            "pool": self.name,
            "target": self.target,
            "state": self.state,
            "time": self.taken_at,
            "size": s.size,
            "ready": s.ready,
            "sessions": s.sessions,
            "calls_ok": s.calls_ok,
            "calls_failed": dict(s.calls_failed),
            "restarts": s.restarts,
            "recycles": s.recycles,
            "failed_starts": s.failed_starts,
            "queue": {
                "total": self.queue.total,
                "calls": self.queue.calls,
                "checkouts": self.queue.checkouts,
                "sessions": self.queue.sessions,
            },
            "workers": [
                {
                    "id": w.id,
                    "pid": w.pid,
                    "state": w.state,
                    "started_at": w.started_at,
                    "uptime": w.uptime,
                    "calls_served": w.calls_served,
                    "inflight": w.inflight,
                    "sessions": w.sessions,
                    "leased": w.leased,
                    "rss": w.rss,
                    "note": w.note,
                    "node_id": w.node_id,
                    "node_address": w.node_address,
                }
                for w in self.workers
            ],
            "nodes": [
                {
                    "id": n.id,
                    "address": n.address,
                    "workers": n.workers,
                    "ready": n.ready,
                    "inflight": n.inflight,
                    "sessions": n.sessions,
                }
                for n in self.nodes
            ],
            "evictions": [
                {
                    "time": e.time,
                    "worker_id": e.worker_id,
                    "pid": e.pid,
                    "kind": e.kind,
                    "reason": e.reason,
                }
                for e in self.evictions
            ],
        }


def _worker_info(
    worker: WorkerHandle, now: float, wall: float, rss: bool, recycle_pending: str | None
) -> WorkerInfo:
    uptime = max(0.0, now - worker.started_at)
    return WorkerInfo(
        id=worker.id,
        pid=worker.pid,
        state=worker.state.value,
        started_at=wall - uptime,
        uptime=uptime,
        calls_served=worker.calls_served,
        inflight=worker.inflight,
        sessions=len(worker.sessions),
        leased=worker.leased,
        rss=worker.sample_rss() if rss else None,  # None for a worker on another host
        note=worker.kill_reason or worker.recycle_reason or recycle_pending,
        node_id=worker.node_id,
        node_address=worker.node_address,
    )


def _by_node(workers: Iterable[WorkerInfo]) -> tuple[NodeInfo, ...]:
    """The placed workers summed up by node, most workers first."""
    found: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        if w.node_id is not None:
            found.setdefault(w.node_id, []).append(w)
    nodes = [
        NodeInfo(
            id=node,
            address=next((w.node_address for w in ws if w.node_address), None),
            workers=len(ws),
            ready=sum(w.state in ("ready", "busy") for w in ws),
            inflight=sum(w.inflight for w in ws),
            sessions=sum(w.sessions for w in ws),
        )
        for node, ws in found.items()
    ]
    return tuple(sorted(nodes, key=lambda n: (-n.workers, n.id)))


def build_status(
    *,
    name: str,
    target: str,
    state: str,
    workers: Iterable[WorkerHandle],
    queue: QueueInfo,
    evictions: EvictionLog,
    stats: PoolStats,
    rss: bool,
    recycle_pending: Callable[[WorkerHandle], str | None] = lambda _worker: None,
) -> PoolStatus:
    """Assemble a ``PoolStatus`` from the pool's parts (called by ``Pool.status``).

    ``recycle_pending`` tells why a worker waits to be recycled (the supervisor's).
    """
    now, wall = time.monotonic(), time.time()
    infos = tuple(_worker_info(w, now, wall, rss, recycle_pending(w)) for w in workers)
    return PoolStatus(
        name=name,
        target=target,
        state=state,
        taken_at=wall,
        workers=infos,
        queue=queue,
        evictions=evictions.recent(),
        stats=stats,
        nodes=_by_node(infos),
    )
