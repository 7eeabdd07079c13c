"""The exceptions corral raises, one class per distinct way of failing.

Owns: the exception tree and how each error renders its details. Must not touch:
processes, the event loop or the wire; errors are plain values built by the
modules that detect the failure.

    CorralError
    ├── RemoteError                 the handler raised (worker stays)
    │   └── MethodNotFound          no handler by that name (worker stays)
    ├── WorkerCrashed               the worker died during the call (replaced)
    │   └── SessionLost             the session's worker died; its state is gone
    ├── CallTimeout (TimeoutError)  the call ran past its deadline
    ├── PoolTimeout (TimeoutError)  no worker became free within the checkout timeout
    ├── PoolClosed                  the pool is not started, or is closing
    ├── PoolOverloaded              the checkout queue is full (max_waiting)
    ├── PoolFailed                  workers keep failing to start and none is live
    ├── WorkerStartError            a worker could not start (bad target, import error)
    │   └── PlacementError          ...because of where it was placed, not its code
    ├── ProtocolError               a worker broke the protocol (replaced)
    ├── PayloadTooLarge             a message is over the size limit (nothing sent)
    ├── EncodeError (TypeError)     an argument cannot be encoded (nothing sent)
    ├── CircuitOpen                 a pool's circuit breaker is open (nothing sent)
    └── AllPoolsFailed              every pool of a workload's chain refused or failed

Every error carries the attributes below (None where they do not apply), so a log
line or a traceback always says which worker, which call and, for a dead worker,
its exit code (negative for a signal) and the tail of its stderr.
"""

from __future__ import annotations

import signal
from typing import Any, Literal

__all__ = [
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
    "counts_against_restart_budget",
    "describe_exit",
]

_STDERR_TAIL_SHOWN = 2000


def describe_exit(exit_code: int | None) -> str:
    """Say how a process ended: ``"exit code 1"`` or ``"signal SIGKILL"``."""
    if exit_code is None:
        return "still running"
    if exit_code < 0:
        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


class CorralError(Exception):
    """Base class of every error corral raises."""

    def __init__(
        self,
        message: str,
        *,
        worker_id: str | None = None,
        pid: int | None = None,
        method: str | None = None,
        call_id: int | None = None,
        exit_code: int | None = None,
        stderr_tail: str | None = None,
        session: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.worker_id = worker_id
        self.pid = pid
        self.method = method
        self.call_id = call_id
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.session = session

    def details(self) -> dict[str, Any]:
        """The context attributes that are set, by name."""
        names = ("worker_id", "pid", "method", "call_id", "session", "exit_code")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __str__(self) -> str:
        parts = [self.message]
        where = []
        if self.worker_id is not None:
            where.append(f"worker {self.worker_id}")
        if self.pid is not None:
            where.append(f"pid {self.pid}")
        if self.method is not None:
            where.append(f"method {self.method!r}")
        if self.call_id is not None:
            where.append(f"call {self.call_id}")
        if self.session is not None:
            where.append(f"session {self.session!r}")
        if self.exit_code is not None:
            where.append(describe_exit(self.exit_code))
        if where:
            parts.append(f"[{', '.join(where)}]")
        text = " ".join(parts)
        if self.stderr_tail:
            tail = self.stderr_tail[-_STDERR_TAIL_SHOWN:]
            text += "\n--- worker stderr (tail) ---\n" + tail.rstrip("\n")
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[CorralError], message: str, state: dict[str, Any]) -> CorralError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class RemoteError(CorralError):
    """The handler raised an exception inside the worker. The worker stays in the pool.

    ``type`` is the qualified name of the remote exception class, ``traceback`` its
    formatted traceback as seen in the worker.
    """

    def __init__(self, message: str, *, type: str, traceback: str = "", **context: Any) -> None:
        super().__init__(message, **context)
        self.type = type
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.type}: {super().__str__()}"


class MethodNotFound(RemoteError):
    """No handler is registered under that name; the message lists some that are."""

    def __str__(self) -> str:
        # The class name already says what failed: no "MethodNotFound: " prefix.
        return CorralError.__str__(self)


class WorkerCrashed(CorralError):
    """The worker process died while the call was in flight; it is being replaced."""


class SessionLost(WorkerCrashed):
    """The worker holding this session died, before or during the call.

    Reported once: the next call with the same session id starts a fresh session.
    """


class CallTimeout(CorralError, TimeoutError):
    """The call ran past its deadline (queue wait + wire + work)."""


class PoolTimeout(CorralError, TimeoutError):
    """No worker became free within the checkout timeout, or within ``queue_timeout`` for a
    plain call or stream (which then did not run)."""


class PoolClosed(CorralError):
    """The pool is not started, or is closing or closed."""


class PoolOverloaded(CorralError):
    """The checkout queue is full (``max_waiting``): load is shed at once."""


class PoolFailed(CorralError):
    """Workers keep failing to start and none is live; the pool retries with backoff."""


class WorkerStartError(CorralError):
    """A worker could not start: bad target, import error, crash in ``on_startup``."""


PlacementCause = Literal["placement", "node_lost", "lost", "listener_busy"]


class PlacementError(WorkerStartError):
    """A worker start failed because of where it was placed, not because of its code.

    The worker's own code never failed: the cluster could not place it, its
    node died under it, it was lost before it said hello (no exit status), or
    the pool's listener was too busy to let it connect back. Such a start does
    not use up the restart budget (``max_restarts``): the pool tries again,
    with its usual backoff, and Ray places the worker wherever there is room.
    ``cause`` says which: ``"placement"``, ``"node_lost"``, ``"lost"`` or
    ``"listener_busy"``.
    """

    def __init__(self, message: str, *, cause: PlacementCause, **context: Any) -> None:
        super().__init__(message, **context)
        self.cause: PlacementCause = cause


def counts_against_restart_budget(error: BaseException) -> bool:
    """Whether a failed start was the worker's own (it uses up ``max_restarts``).

    The one rule the pool's restart budget consults: a ``PlacementError`` is
    not the worker's failure; every other start error is.
    """
    return not isinstance(error, PlacementError)


class ProtocolError(CorralError):
    """A peer broke the wire protocol (malformed or oversize frame, unknown reply)."""


class PayloadTooLarge(CorralError):
    """A message is larger than ``max_message_size``; nothing was sent."""


class EncodeError(CorralError, TypeError):
    """An argument cannot be encoded as MessagePack; nothing was sent."""


class CircuitOpen(CorralError):
    """A pool's circuit breaker is open: the call was refused at once, nothing was sent.

    ``pool`` names the pool, ``retry_after`` says in how many seconds the
    breaker lets a probe through (0 while half-open and its probes are out).
    """

    def __init__(self, message: str, *, pool: str, retry_after: float, **context: Any) -> None:
        super().__init__(message, **context)
        self.pool = pool
        self.retry_after = retry_after


class AllPoolsFailed(CorralError):
    """Every pool a workload may use refused or failed the call.

    ``attempts`` lists, in order, each ``(pool name, error)`` tried; the last
    error is also the ``__cause__``. Raised by ``corral.Pools`` when a fallback
    chain of more than one pool runs out.
    """

    def __init__(
        self,
        message: str,
        *,
        workload: str,
        attempts: tuple[tuple[str, CorralError], ...],
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.workload = workload
        self.attempts = attempts

    def __str__(self) -> str:
        lines = [super().__str__()]
        for pool, error in self.attempts:
            first = str(error).split("\n", 1)[0]
            lines.append(f"  {pool}: {type(error).__name__}: {first}")
        return "\n".join(lines)
