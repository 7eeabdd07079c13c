"""corral: an asyncio-native pool of Python worker processes.

    from corral import Pool

    async with Pool("myapp.workers:app", size=4) as pool:
        await pool.call("add", 1, 2)

The worker side lives in ``corral.worker``. Everything importable from here is
public; modules whose names start with an underscore are not.
"""

from ._config import PoolConfig
from ._errors import (
    CallTimeout,
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
from ._stats import LatencyHistogram, PoolStats
from ._status import Eviction, NodeInfo, PoolStatus, QueueInfo, WorkerInfo

__version__ = "0.1.0"
"""corral's version."""

__all__ = [
    "CallStream",
    "CallTimeout",
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
    "PoolTimeout",
    "ProtocolError",
    "QueueInfo",
    "RemoteError",
    "SessionLost",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerLease",
    "WorkerStartError",
    "__version__",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "corral"
del _name, _obj
