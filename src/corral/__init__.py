"""corral: an asyncio-native pool of Python worker processes.

    from corral import Pool

    async with Pool("myapp.workers:app", size=4) as pool:
        await pool.call("add", 1, 2)

The worker side lives in ``corral.worker``. Everything importable from here is
public; modules whose names start with an underscore are not.

Names are loaded on first use (PEP 562): a worker process imports
``corral.worker``, which runs this file, and must not pay for the pool's
modules (and what they import) that it never uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._breaker import BreakerConfig
    from ._config import PoolConfig
    from ._errors import (
        AllPoolsFailed,
        CallTimeout,
        CircuitOpen,
        CorralError,
        EncodeError,
        MethodNotFound,
        PayloadTooLarge,
        PlacementError,
        PoolClosed,
        PoolFailed,
        PoolOverloaded,
        PoolTimeout,
        ProtocolError,
        RemoteError,
        SessionLost,
        WorkerCrashed,
        WorkerStartError,
    )
    from ._pool import CallStream, Pool, WorkerLease
    from ._pools import Pools, PoolsStats, Routed, RoutedStream, RouteStats, Rule, Workload
    from ._retry import RetryPolicy
    from ._stats import LatencyHistogram, PoolStats
    from ._status import Eviction, NodeInfo, PoolStatus, QueueInfo, WorkerInfo

__version__ = "0.1.0"
"""corral's version."""

__all__ = [
    "AllPoolsFailed",
    "BreakerConfig",
    "CallStream",
    "CallTimeout",
    "CircuitOpen",
    "CorralError",
    "EncodeError",
    "Eviction",
    "LatencyHistogram",
    "MethodNotFound",
    "NodeInfo",
    "PayloadTooLarge",
    "PlacementError",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolFailed",
    "PoolOverloaded",
    "PoolStats",
    "PoolStatus",
    "Pools",
    "PoolsStats",
    "PoolTimeout",
    "ProtocolError",
    "QueueInfo",
    "RemoteError",
    "RetryPolicy",
    "RouteStats",
    "Routed",
    "RoutedStream",
    "Rule",
    "SessionLost",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerLease",
    "WorkerStartError",
    "Workload",
    "__version__",
]


# Where each public name lives; a class's ``__module__`` is set to "corral" when loaded.
_WHERE = {
    "PoolConfig": "._config",
    "BreakerConfig": "._breaker",
    "RetryPolicy": "._retry",
    **dict.fromkeys(
        [
            "AllPoolsFailed",
            "CallTimeout",
            "CircuitOpen",
            "CorralError",
            "EncodeError",
            "MethodNotFound",
            "PayloadTooLarge",
            "PlacementError",
            "PoolClosed",
            "PoolFailed",
            "PoolOverloaded",
            "PoolTimeout",
            "ProtocolError",
            "RemoteError",
            "SessionLost",
            "WorkerCrashed",
            "WorkerStartError",
        ],
        "._errors",
    ),
    **dict.fromkeys(["CallStream", "Pool", "WorkerLease"], "._pool"),
    **dict.fromkeys(
        ["Pools", "PoolsStats", "Routed", "RoutedStream", "RouteStats", "Rule", "Workload"],
        "._pools",
    ),
    **dict.fromkeys(["LatencyHistogram", "PoolStats"], "._stats"),
    **dict.fromkeys(["Eviction", "NodeInfo", "PoolStatus", "QueueInfo", "WorkerInfo"], "._status"),
}


def __getattr__(name: str) -> Any:
    """Load every public name on the first use of one (the parent uses them all)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    for public, where in _WHERE.items():
        value = getattr(importlib.import_module(where, __name__), public)
        if isinstance(value, type):
            value.__module__ = "corral"
        globals()[public] = value  # found directly from now on
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
