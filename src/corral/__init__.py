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
    from ._config import PoolConfig
    from ._errors import (
        CallTimeout,
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
    from ._stats import LatencyHistogram, PoolStats
    from ._status import Eviction, PoolStatus, QueueInfo, WorkerInfo

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
    "PayloadTooLarge",
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


# Where each public name lives; a class's ``__module__`` is set to "corral" when loaded.
_WHERE = {
    "PoolConfig": "._config",
    **dict.fromkeys(
        [
            "CallTimeout",
            "CorralError",
            "EncodeError",
            "MethodNotFound",
            "PayloadTooLarge",
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
    **dict.fromkeys(["LatencyHistogram", "PoolStats"], "._stats"),
    **dict.fromkeys(["Eviction", "PoolStatus", "QueueInfo", "WorkerInfo"], "._status"),
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
