"""Worker apps for the observability tests: logs, failures, and their own finished spans.

With ``CORRAL_TEST_TRACING=1`` in its environment, a worker sets up the
OpenTelemetry SDK in ``on_startup`` with an in-memory exporter, and
``finished_spans()`` hands the spans it recorded back to the test. Without it,
nothing here imports OpenTelemetry, so a test can check that corral does not
either. With ``CORRAL_TEST_NO_OPENTELEMETRY=1``, OpenTelemetry cannot be
imported in the worker at all, as if it were not installed there. With
``CORRAL_TEST_SPAN_FILE=PATH``, the worker follows the recipe of
docs/observability.md instead: a BatchSpanProcessor, flushed by shutting the
provider down in ``on_shutdown``, exporting one line per span to PATH.

``app`` has async handlers, so its sync handlers run on the sync lane;
``inline_app`` has the same handlers minus the async ones and runs them inline.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from corral.worker import App, Context

app = App()
inline_app = App(sync_mode="inline")

_exporter: Any = None
_provider: Any = None


def _both(fn: Callable[..., Any]) -> Callable[..., Any]:
    app.handler(fn)
    inline_app.handler(fn)
    return fn


class _NoOpenTelemetry:
    """A meta path finder that makes every ``opentelemetry`` import fail."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"No module named {name!r} (blocked by the test)")


def _set_up_tracing() -> None:
    global _exporter
    if os.environ.get("CORRAL_TEST_NO_OPENTELEMETRY") == "1":
        sys.meta_path.insert(0, _NoOpenTelemetry())  # type: ignore[arg-type]
    if os.environ.get("CORRAL_TEST_SPAN_FILE"):
        _export_in_batches_to(os.environ["CORRAL_TEST_SPAN_FILE"])
        return
    if os.environ.get("CORRAL_TEST_TRACING") != "1":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)


def _export_in_batches_to(path: str) -> None:
    global _provider
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    def one_line(span: Any) -> str:
        parent = "-" if span.parent is None else f"{span.parent.span_id:016x}"
        return f"{span.name}|{span.kind.name}|{span.context.trace_id:032x}|{parent}\n"

    out = open(path, "a")  # noqa: SIM115 - closed by the exporter's shutdown
    _provider = TracerProvider()
    _provider.add_span_processor(
        BatchSpanProcessor(
            ConsoleSpanExporter(out=out, formatter=one_line), schedule_delay_millis=60_000
        )
    )
    trace.set_tracer_provider(_provider)


def _flush_spans() -> None:
    if _provider is not None:
        _provider.shutdown()


app.on_startup(_set_up_tracing)
inline_app.on_startup(_set_up_tracing)
app.on_shutdown(_flush_spans)
inline_app.on_shutdown(_flush_spans)


@_both
def add(a: int, b: int) -> int:
    return a + b


@_both
def fail(message: str) -> None:
    raise ValueError(message)


@_both
def unencodable() -> object:
    return object()


@_both
def exit_now(code: int = 1) -> None:
    os._exit(code)


@_both
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@_both
def wait_cancelled(seconds: float, *, ctx: Context) -> bool:
    return ctx.wait_cancelled(seconds)


@_both
def announce_then_wait(seconds: float, *, ctx: Context) -> bool:
    """Says "waiting" on stderr (the parent sees it), then waits to be cancelled."""
    sys.stderr.write(f"waiting in call {ctx.call_id}\n")
    sys.stderr.flush()
    return ctx.wait_cancelled(seconds)


@_both
def whoami(*, ctx: Context) -> dict[str, Any]:
    return {"pid": os.getpid(), "worker_id": ctx.worker_id}


@_both
def log_with_structlog(text: str) -> None:
    """Logs through the worker's own, unconfigured, structlog."""
    structlog.get_logger("myapp").info("myapp.said", text=text)


@_both
def count(n: int):
    yield from range(n)


@_both
def opentelemetry_imported() -> bool:
    return any(name.split(".")[0] == "opentelemetry" for name in sys.modules)


@_both
def nested_span_sync() -> str:
    """Opens a span of the handler's own: it must be a child of corral's server span."""
    from opentelemetry import trace

    with trace.get_tracer("myapp").start_as_current_span("myapp.inner"):
        return "done"


@app.handler
async def nested_span_async() -> str:
    from opentelemetry import trace

    with trace.get_tracer("myapp").start_as_current_span("myapp.inner"):
        await asyncio.sleep(0)
        return "done"


@app.handler
async def async_fail(message: str) -> None:
    await asyncio.sleep(0)
    raise KeyError(message)


@_both
def finished_spans() -> list[dict[str, Any]]:
    """The spans this worker has finished so far, oldest first, as plain data."""
    if _exporter is None:
        return []
    spans = []
    for span in _exporter.get_finished_spans():
        parent = span.parent
        spans.append(
            {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_span_id": None if parent is None else f"{parent.span_id:016x}",
                "attributes": dict(span.attributes or {}),
                "status": span.status.status_code.name,
            }
        )
    return spans
