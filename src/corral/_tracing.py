"""The seam between the pool and an optional call tracer (``corral.otel`` is one).

Owns: the two small protocols a tracer implements, so the pool can open a span
per call without knowing which tracing library is behind it. Must not touch:
any tracing library (nothing is imported here), or the pool's state.

A pool with no tracer (the default) pays one attribute test per call.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["CallSpan", "CallTracer"]


class CallSpan(Protocol):
    """One call as the tracer sees it, from start to outcome."""

    #: W3C ``traceparent`` of this span, sent to the worker in the Call frame
    #: (None: send no trace context).
    traceparent: str | None

    def placed(self, worker_id: str, pid: int | None) -> None:
        """The call was given to this worker (again, after a retry)."""

    def end(self, error: BaseException | None) -> None:
        """The call ended: ``None`` is success; a CancelledError is a cancellation."""


class CallTracer(Protocol):
    """What a pool needs from a tracer: a span per call or stream."""

    def start(self, method: str, session: str | None, stream: bool) -> CallSpan:
        """Open the span of a call (or a stream) that begins now."""
