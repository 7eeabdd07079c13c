"""The call path: starting a call on a worker, and counting how calls end.

Owns: what every call does between being given a worker and hearing back, in
one place for ``Pool.call``, ``WorkerLease.call`` and streams: its deadline
(``deadline``), its span (the tracer ``corral.otel`` sets), noting the
session's use, sending it (``start``: one function for every kind of call),
and the pool's call counters and latency histogram (``succeeded``,
``ended``). Must not touch: which worker a call goes to (the dispatcher), the
wire (the worker's handle), or the workers' lifecycle (the supervisor).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from ._door import check_timeout
from ._errors import CorralError, EncodeError, PayloadTooLarge, RemoteError
from ._handle import PendingCall, WorkerHandle
from ._log import Logger, Repeats
from ._sessions import Sessions
from ._stats import LatencyRecorder
from ._tracing import CallSpan, CallTracer

__all__ = ["CallPath", "clock"]

clock = time.perf_counter
# Errors that leave the worker as it was: the caller's (or its handler's) own.
_CALLER_ERRORS: tuple[type[CorralError], ...] = (RemoteError, EncodeError, PayloadTooLarge)


class CallPath:
    """Starts calls on the workers they were given, and counts how they end."""

    __slots__ = (
        "call_timeout",
        "calls_cancelled",
        "calls_failed",
        "calls_ok",
        "failures_log",
        "latency",
        "loop",
        "sessions",
        "stream_window",
        "tracer",
    )

    def __init__(
        self,
        sessions: Sessions,
        call_timeout: float | None,
        stream_window: int,
        log: Logger,
    ) -> None:
        self.sessions = sessions
        self.call_timeout = call_timeout  # the default when a call gives none
        self.stream_window = stream_window
        # call.failed storms (load shed, a pool down) log a count per second, not a line per call
        self.failures_log = Repeats(log)
        self.tracer: CallTracer | None = None  # set by corral.otel.instrument()
        self.loop: asyncio.AbstractEventLoop | None = None  # the pool's, once started
        self.calls_ok = 0
        self.calls_failed: collections.Counter[str] = collections.Counter()
        self.calls_cancelled = 0
        self.latency = LatencyRecorder()

    def deadline(self, timeout: float | None) -> float | None:
        """The loop time by which a call must end (``timeout``, else ``call_timeout``)."""
        timeout = check_timeout(timeout)
        if timeout is None:
            timeout = self.call_timeout
            if timeout is None:
                return None
        loop = self.loop or asyncio.get_running_loop()  # kept: no getpid() per call
        return loop.time() + timeout

    def span(self, method: str, session: str | None, stream: bool) -> CallSpan | None:
        tracer = self.tracer
        return None if tracer is None else tracer.start(method, session, stream)

    def start(
        self,
        worker: WorkerHandle,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        session: str | None,
        deadline: float | None,
        span: CallSpan | None,
        *,
        reserved: bool = True,
        stream_window: int = 0,
        future: asyncio.Future[Any] | None = None,
    ) -> PendingCall:
        """Send one call on ``worker``; its ``PendingCall`` settles with the outcome.

        ``reserved``: the caller holds a slot on the worker (from the dispatcher),
        which the call takes over; a checkout's calls hold none. ``future``: the
        one to settle (a queued call's); a new one if None.
        """
        if session is not None:
            self.sessions.touch(session)
        if span is None:
            if reserved and not stream_window and future is None:
                # A plain call that is not a queued one (whose future it must settle):
                # no keywords, the cheaper call.
                return worker.send_call(method, args, kwargs, session, deadline)
            return worker.send_call(
                method,
                args,
                kwargs,
                session,
                deadline,
                stream_window=stream_window,
                reserved=reserved,
                future=future,
            )
        span.placed(worker.id, worker.pid)
        return worker.send_call(
            method,
            args,
            kwargs,
            session=session,
            deadline=deadline,
            stream_window=stream_window,
            reserved=reserved,
            trace=span.traceparent,
            future=future,
        )

    def succeeded(self, started: float | None, span: CallSpan | None) -> None:
        """Count a call (``started``: when it began) or a stream that returned."""
        self.calls_ok += 1
        if started is not None:
            self.latency.record(clock() - started)
        if span is not None:
            span.end(None)

    def ended(
        self,
        exc: BaseException,
        method: str,
        session: str | None,
        started: float | None,
        span: CallSpan | None,
    ) -> None:
        """Count and log a call or stream that ended with ``exc``, and close its span.

        ``started`` is when a call began (its time goes into the histogram);
        None for a stream.
        """
        if isinstance(exc, CorralError):
            self.calls_failed[type(exc).__name__] += 1
            if started is not None:
                self.latency.record(clock() - started)
            level = "info" if isinstance(exc, _CALLER_ERRORS) else "warning"
            remote = {"remote_type": exc.type} if isinstance(exc, RemoteError) else {}
            self.failures_log.log(
                level,
                (type(exc), method, remote.get("remote_type")),
                "call.failed",
                method=method,
                call_id=exc.call_id,
                worker_id=exc.worker_id,
                pid=exc.pid,
                session=session,
                error_type=type(exc).__name__,
                error=exc.message,
                **remote,
            )
        elif isinstance(exc, asyncio.CancelledError):
            self.calls_cancelled += 1
        if span is not None:
            span.end(exc)
