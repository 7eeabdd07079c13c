"""OpenTelemetry tracing for a pool: a CLIENT span per call, continued in the worker.

    from corral import Pool
    from corral.otel import instrument

    pool = instrument(Pool("myapp.workers:app"))

Each ``pool.call()``, ``pool.stream()`` and ``WorkerLease.call()`` of an
instrumented pool opens a CLIENT span (``corral.call <method>`` or
``corral.stream <method>``), a child of the caller's current span, and sends its
W3C ``traceparent`` to the worker in the Call frame. A worker where
OpenTelemetry is importable opens a SERVER span, a child of that one, around the
handler; spans the handler opens are children of it. The worker's spans go to
the worker process's own tracer provider: set one up in an ``on_startup`` hook
(docs/observability.md shows how).

A ``corral.Pools`` front can be instrumented too: ``instrument(pools)`` traces
its pools as above and opens an INTERNAL span ``corral.route <method>`` around
each routed call, the parent of the pool's CLIENT spans, with the routing
decision as attributes: ``corral.route.workload``, ``corral.route.pool`` (the
pool that served), ``corral.route.breaker`` (its breaker's state),
``corral.route.fallbacks``, ``corral.route.retries`` and ``corral.route.tried``
(each pool that did not serve, and why).

Owns: the parent side of tracing (span names, attributes, outcome, the
traceparent it sends). Must not touch: the pool's state beyond its tracer slot.
Importing this module imports ``opentelemetry-api`` (the ``corral[otel]``
extra); corral itself never does, and a pool that is not instrumented pays one
attribute test per call.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from . import __version__
from ._errors import CallTimeout, RemoteError
from ._pool import Pool
from ._pools import Pools

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["instrument", "uninstrument"]

_P = TypeVar("_P", Pool, Pools)


def instrument(pool: _P, *, tracer_provider: TracerProvider | None = None) -> _P:
    """Trace every call of ``pool`` (a Pool, or a Pools front and its pools); returns it.

    Args:
        pool: the pool or front to trace (started or not).
        tracer_provider: where the parent's spans go; the global provider
            (``opentelemetry.trace.set_tracer_provider``) when None.

    Raises:
        TypeError: ``pool`` is neither a ``corral.Pool`` nor a ``corral.Pools``.
    """
    tracer = trace.get_tracer("corral", __version__, tracer_provider=tracer_provider)
    if isinstance(pool, Pools):
        for member in pool.pools.values():
            member._tracer = _OtelTracer(tracer, member.name)
        pool.set_tracer(_OtelRouteTracer(tracer))
        return pool
    if not isinstance(pool, Pool):
        raise TypeError(
            f"instrument() takes a corral.Pool or corral.Pools, got {type(pool).__qualname__}"
        )
    pool._tracer = _OtelTracer(tracer, pool.name)
    return pool


def uninstrument(pool: _P) -> _P:
    """Stop tracing (those in flight still end their spans); returns the pool or front."""
    if isinstance(pool, Pools):
        pool.set_tracer(None)
        for member in pool.pools.values():
            member._tracer = None
        return pool
    pool._tracer = None
    return pool


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


class _OtelTracer:
    """The pool's CallTracer: one CLIENT span per call or stream."""

    __slots__ = ("_attributes", "_tracer")

    def __init__(self, tracer: trace.Tracer, pool_name: str) -> None:
        self._tracer = tracer
        self._attributes = {"rpc.system": "corral", "corral.pool": pool_name}

    def start(self, method: str, session: str | None, stream: bool) -> _OtelSpan:
        attributes: dict[str, Any] = {**self._attributes, "rpc.method": method}
        if session is not None:
            attributes["corral.session"] = session
        span = self._tracer.start_span(
            f"corral.{'stream' if stream else 'call'} {method}",
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
        )
        return _OtelSpan(span)


class _OtelSpan:
    """One call's CLIENT span (a CallSpan)."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        context = span.get_span_context()
        self.traceparent: str | None = None
        if context.is_valid:
            self.traceparent = (
                f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
            )

    def placed(self, worker_id: str, pid: int | None) -> None:
        self._span.set_attribute("corral.worker.id", worker_id)
        if pid is not None:
            self._span.set_attribute("corral.worker.pid", pid)

    def end(self, error: BaseException | None) -> None:
        span = self._span
        if error is None:
            outcome = "ok"
        elif isinstance(error, asyncio.CancelledError):
            outcome = "cancelled"
        else:
            outcome = "timeout" if isinstance(error, CallTimeout) else "error"
            span.set_attribute("error.type", _type_name(error))
            if isinstance(error, RemoteError):
                span.set_attribute("corral.remote.type", error.type)
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        span.set_attribute("corral.outcome", outcome)
        span.end()


class _OtelRouteTracer:
    """The front's RouteTracer: one INTERNAL span per routed call, current while it runs."""

    __slots__ = ("_tracer",)

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start(self, method: str, workload: str) -> _OtelRouteSpan:
        span = self._tracer.start_span(
            f"corral.route {method}",
            kind=trace.SpanKind.INTERNAL,
            attributes={
                "rpc.system": "corral",
                "rpc.method": method,
                "corral.route.workload": workload,
            },
        )
        return _OtelRouteSpan(span)


class _OtelRouteSpan:
    """One routed call's span (a RouteSpan); the pools' CLIENT spans are its children."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def set(self, key: str, value: str | int | bool) -> None:
        self._span.set_attribute(key, value)

    def end(self, error: BaseException | None) -> None:
        span = self._span
        if error is not None and not isinstance(error, asyncio.CancelledError):
            span.set_attribute("error.type", _type_name(error))
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        otel_context.detach(self._token)
        span.end()
