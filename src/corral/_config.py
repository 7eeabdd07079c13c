"""Pool settings: one frozen, validated value object with the defaults and why.

Owns: every knob's name, default and valid range. Must not touch: processes or
the event loop; a PoolConfig is plain data, checked when it is built.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._compression import check_compression
from ._door import check_count, check_seconds, check_timeout
from ._framing import DEFAULT_MAX_MESSAGE_SIZE, MAX_POSSIBLE_SIZE

__all__ = ["PoolConfig"]

#: Where the large-buffer path starts paying off on this kind of machine
#: (docs/performance.md, "Large buffers").
DEFAULT_LARGE_BUFFER_THRESHOLD = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """How a Pool starts, places, waits and stops. All times are in seconds."""

    #: Worker processes to keep running. Default: the number of CPUs.
    size: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Elastic size: the pool starts ``size`` workers, grows up to ``max_size``
    #: while callers wait (at most ``max_spawn_rate`` starts a second), and
    #: retires workers idle for ``idle_timeout`` down to ``min_size``. Both
    #: default to ``size``: a fixed pool.
    min_size: int | None = None
    max_size: int | None = None
    idle_timeout: float = 60.0
    max_spawn_rate: float = 4.0
    #: Interpreter for the workers; None means the parent's, with its sys.path.
    python: str | None = None
    #: Added to (or overriding) the parent's environment in each worker.
    env: Mapping[str, str] = field(default_factory=dict)
    #: When set, workers inherit only these variables of the parent's environment
    #: (plus ``env``), so secrets elsewhere in it never reach worker processes.
    env_allowlist: Sequence[str] | None = None
    #: Set OMP/OpenBLAS/MKL/numexpr thread counts to 1 in each worker unless the
    #: parent or ``env`` sets them: N workers x N BLAS threads oversubscribes the CPUs.
    single_threaded_math: bool = True
    #: Resource limits applied to each worker process from the parent, by name:
    #: ``{"cpu": seconds, "nofile": count, "core": bytes, "nproc": count}``.
    worker_rlimits: Mapping[str, int] = field(default_factory=dict)
    #: Modules imported once, in a template process that serves no call; workers
    #: (new and replacements) are forked from it, so they start without paying
    #: for those imports. Empty: every worker is spawned and imports for itself.
    preload: Sequence[str] = ()
    #: Working directory of the workers; None means the parent's.
    cwd: str | None = None
    #: Calls one worker may have in flight at once (pipelining). Sync handlers
    #: still run one at a time; calls sent ahead wait in the worker's pipe, so
    #: the next one starts without a round trip.
    max_concurrency: int = 16
    #: Default deadline of call() and stream() when no timeout= is given.
    call_timeout: float | None = None
    #: How long a worker has to import its target and run on_startup.
    startup_timeout: float = 60.0
    #: Largest message accepted either way; a 64 MiB argument fits by default.
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Bytes-like arguments and results (top level or nested in lists, tuples and
    #: dicts) larger than this many bytes travel through shared memory in
    #: /dev/shm instead of the pipes; they still count against max_message_size.
    #: None or 0 keeps everything on the pipes.
    large_buffer_threshold: int | None = DEFAULT_LARGE_BUFFER_THRESHOLD
    #: Workers that reach the pool over TCP (``SubprocessShimLauncher``, Ray):
    #: compress the streamed buffers of arrays and tables (those over
    #: ``large_buffer_threshold``, and of at least 64 KiB) with ``"lz4"``
    #: (``corral[lz4]``) or ``"zstd"`` (``corral[zstd]``), both ways. Pipes and
    #: shared memory are never compressed. None: no compression.
    compression: str | None = None
    #: What a ``bytes`` value that came through shared memory arrives as, in a
    #: handler's arguments and in call and stream results: ``"bytes"`` (a copy,
    #: the same type as a small one) or ``"memoryview"`` (a read-only view of the
    #: segment, no copy, valid for as long as it is referenced). Values under
    #: the threshold, or on the pipes, arrive as ``bytes`` either way.
    #: See docs/decisions/0031.
    large_bytes: Literal["bytes", "memoryview"] = "bytes"
    #: Callers allowed to wait for a worker; past it, PoolOverloaded. None: no bound.
    max_waiting: int | None = None
    #: How long a plain call or stream may wait for a worker before it is refused
    #: with PoolTimeout (it did not run, so it may be sent elsewhere: the Pools
    #: front falls back on it). None: it waits until its own deadline.
    queue_timeout: float | None = None
    #: After a Cancel, how long a worker has to acknowledge before it is evicted.
    cancel_grace: float = 1.0
    #: On close: how long calls in flight may finish before workers are stopped.
    drain_timeout: float = 10.0
    #: On close: how long a worker has after Shutdown before SIGTERM, and after
    #: SIGTERM before SIGKILL.
    shutdown_grace: float = 2.0
    kill_grace: float = 5.0
    #: Failed starts tolerated within restart_window before the pool is failed.
    max_restarts: int = 5
    restart_window: float = 60.0
    #: Backoff between failed starts: doubles from the first value up to the cap.
    restart_backoff: float = 0.1
    restart_backoff_max: float = 10.0
    #: Ping every worker this often; one silent for heartbeat_timeout is evicted.
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    #: Items a stream may run ahead of its consumer.
    stream_window: int = 32
    #: Recycle a worker after this many calls (each worker draws its own limit
    #: within +-recycle_jitter of it, so workers do not all recycle at once).
    max_requests: int | None = None
    recycle_jitter: float = 0.1
    #: Recycle a worker this many seconds after it became ready.
    max_lifetime: float | None = None
    #: Recycle a worker whose resident memory (RSS, bytes) passes this limit,
    #: once its sessions have ended; past max_memory_hard even with sessions.
    max_memory: int | None = None
    max_memory_hard: int | None = None
    #: A session idle this long is ended (its worker's on_session_end hooks run).
    session_ttl: float | None = None
    #: New sessions go only to workers holding fewer sessions than this.
    max_sessions_per_worker: int | None = None
    #: Called as ``hook(session_id, error)`` when a session's worker dies; may be async.
    on_session_lost: Callable[[str, BaseException], Any] | None = None

    def __post_init__(self) -> None:
        # Every count is an int and every duration a finite number of seconds, by
        # the same rules as a call's timeout (corral._door): a float count or a nan
        # duration would reach a worker's command line or the loop's timer heap.
        check_count(self.size, "size", minimum=1)
        check_count(self.min_size, "min_size", optional=True)
        check_count(self.max_size, "max_size", minimum=1, optional=True)
        if not 0 <= self.smallest <= self.size <= self.largest:
            raise ValueError(
                f"need 0 <= min_size <= size <= max_size, got {self.smallest}, {self.size}, "
                f"{self.largest}"
            )
        check_count(self.max_concurrency, "max_concurrency", minimum=1)
        check_count(self.max_message_size, "max_message_size", minimum=1)
        if self.max_message_size > MAX_POSSIBLE_SIZE:
            raise ValueError(f"max_message_size must be in 1..{MAX_POSSIBLE_SIZE}")
        check_count(self.large_buffer_threshold, "large_buffer_threshold", optional=True)
        check_compression(self.compression)
        if type(self.large_bytes) is not str:
            raise TypeError(
                "large_bytes must be 'bytes' or 'memoryview', got "
                f"{type(self.large_bytes).__name__}"
            )
        if self.large_bytes not in ("bytes", "memoryview"):
            raise ValueError(
                f"large_bytes must be 'bytes' or 'memoryview', got {self.large_bytes!r}"
            )
        check_count(self.max_waiting, "max_waiting", optional=True)
        check_count(self.max_restarts, "max_restarts")
        check_count(self.stream_window, "stream_window", minimum=1)
        for name in ("max_requests", "max_memory", "max_memory_hard", "max_sessions_per_worker"):
            check_count(getattr(self, name), name, minimum=1, optional=True)
        for name in ("call_timeout", "queue_timeout", "max_lifetime", "session_ttl"):
            check_timeout(getattr(self, name), name)
        jitter = self.recycle_jitter
        if isinstance(jitter, bool) or not isinstance(jitter, numbers.Real):
            raise TypeError(f"recycle_jitter must be a number, got {jitter!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"recycle_jitter must be in [0, 1), got {jitter!r}")
        for name in (
            "startup_timeout",
            "cancel_grace",
            "drain_timeout",
            "shutdown_grace",
            "kill_grace",
            "restart_window",
            "restart_backoff",
            "restart_backoff_max",
            "heartbeat_interval",
            "heartbeat_timeout",
            "idle_timeout",
        ):
            check_seconds(getattr(self, name), name)
        check_seconds(self.max_spawn_rate, "max_spawn_rate", unit="starts a second")
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"env must map str to str, got {key!r}: {value!r}")
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"env has a name or value no process can take: {key!r}")
        for name, limit in self.worker_rlimits.items():
            check_count(limit, f"worker_rlimits[{name!r}]")
        object.__setattr__(self, "env", dict(self.env))
        unknown = set(self.worker_rlimits) - {"cpu", "nofile", "core", "nproc", "as", "data"}
        if unknown:
            raise ValueError(f"unknown worker_rlimits {sorted(unknown)}")
        object.__setattr__(self, "worker_rlimits", dict(self.worker_rlimits))
        if isinstance(self.preload, str):
            raise ValueError("preload must be a sequence of module names, not a string")
        for module in self.preload:
            if not isinstance(module, str) or not all(
                part.isidentifier() for part in module.split(".")
            ):
                raise ValueError(f"preload entries must be module names, got {module!r}")
        object.__setattr__(self, "preload", tuple(self.preload))
        if self.env_allowlist is not None:
            if isinstance(self.env_allowlist, str):
                raise ValueError("env_allowlist must be a sequence of names, not a string")
            object.__setattr__(self, "env_allowlist", tuple(self.env_allowlist))

    @property
    def smallest(self) -> int:
        """The elastic floor: ``min_size``, or ``size`` when unset."""
        return self.size if self.min_size is None else self.min_size

    @property
    def largest(self) -> int:
        """The elastic ceiling: ``max_size``, or ``size`` when unset."""
        return self.size if self.max_size is None else self.max_size

    def replace(self, **changes: object) -> PoolConfig:
        """A copy with ``changes`` applied, validated like a new ``PoolConfig``.

        Raises:
            ValueError: a changed value is invalid.
            TypeError: a name is not a field of ``PoolConfig``.
        """
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        defaults = PoolConfig.__dataclass_fields__
        shown = []
        for name, f in defaults.items():
            value = getattr(self, name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if name == "size" or (value != default and not (name == "env" and not value)):
                shown.append(f"{name}={value!r}")
        return f"PoolConfig({', '.join(shown)})"
