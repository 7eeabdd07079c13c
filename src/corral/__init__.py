"""corral: an asyncio-native pool of Python worker processes.

    from corral import Pool

    async with Pool("myapp.workers:app", size=4) as pool:
        await pool.call("add", 1, 2)

The worker side lives in ``corral.worker``. Everything importable from here is
public; modules whose names start with an underscore are not.
"""

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
from ._status import Eviction, PoolStatus, QueueInfo, WorkerInfo

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
    "PayloadTooLarge",
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

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "corral"
del _name, _obj
