"""Worker-side spans: a SERVER span around each call that carries trace context.

Owns: importing OpenTelemetry lazily, only when the first Call with a
``traceparent`` arrives; continuing the caller's trace; the span's name and
attributes. Must not touch: the wire or the handlers; the runtime says when a
call starts and how it ended.

A worker where OpenTelemetry is not importable runs every call untraced. The
spans go to the worker process's own tracer provider, which the application sets
up (with an exporter) in an ``on_startup`` hook; without one they are no-ops.
"""

from __future__ import annotations

import contextvars
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._messages import Call

__all__ = ["WorkerTracing", "tracing"]

_NOT_LOADED: Any = object()
_tracing: WorkerTracing | None = _NOT_LOADED


def tracing() -> WorkerTracing | None:
    """This process's tracing, loaded on first use; None without OpenTelemetry."""
    global _tracing
    if _tracing is _NOT_LOADED:
        try:
            _tracing = WorkerTracing()
        except ImportError:
            _tracing = None
    return _tracing


class WorkerTracing:
    """Opens and closes the worker's span of a call. Raises ImportError when built
    without OpenTelemetry."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from .. import __version__

        self._tracer = trace.get_tracer("corral.worker", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._attach = context.attach
        self._in_context = trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self._pid = os.getpid()

    def start(self, call: Call, worker_id: str) -> tuple[Any, contextvars.Context]:
        """Open the span of ``call``, a child of the caller's; returns it and a
        context in which it is the current span (the handler runs in it)."""
        parent = self._propagator.extract({"traceparent": call.trace or ""})
        attributes: dict[str, Any] = {
            "rpc.system": "corral",
            "rpc.method": call.method,
            "corral.worker.id": worker_id,
            "corral.worker.pid": self._pid,
            "corral.call.id": call.id,
        }
        if call.session is not None:
            attributes["corral.session"] = call.session
        kind = "stream" if call.stream else "call"
        span = self._tracer.start_span(
            f"corral.{kind} {call.method}", context=parent, kind=self._server, attributes=attributes
        )
        handler_context = contextvars.copy_context()
        handler_context.run(self._attach, self._in_context(span, parent))
        return span, handler_context

    def end(self, span: Any, outcome: str, error_type: str | None) -> None:
        """Close the span with the call's outcome: ok, error, timeout or cancelled."""
        span.set_attribute("corral.outcome", outcome)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
        if outcome in ("error", "timeout"):
            span.set_status(self._status(self._error, error_type or outcome))
        span.end()
