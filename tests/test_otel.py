"""OpenTelemetry: a CLIENT span per call in the parent, its SERVER child in the worker.

The parent's spans go to an SDK TracerProvider with an InMemorySpanExporter made
per test; each worker sets up its own in-memory exporter in ``on_startup``
(``tests/workers/observed.py``) and hands its finished spans back through a
handler.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import corral
from corral import Pool
from corral._messages import Call
from corral.otel import instrument, uninstrument

TARGET = "tests.workers.observed:app"
TRACING = {"CORRAL_TEST_TRACING": "1"}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
async def pool(provider: TracerProvider) -> AsyncIterator[Pool]:
    async with instrument(Pool(TARGET, size=1, env=TRACING), tracer_provider=provider) as pool:
        yield pool


def parent_spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def only(spans: list[Any]) -> Any:
    assert len(spans) == 1, spans
    return spans[0]


async def worker_spans(pool: Pool, name: str) -> list[dict[str, Any]]:
    """The worker's finished spans named ``name`` (the pool has one worker)."""
    return [s for s in await pool.call("finished_spans") if s["name"] == name]


def child_of(worker_span: dict[str, Any], client: ReadableSpan) -> bool:
    return (
        worker_span["trace_id"] == f"{client.context.trace_id:032x}"
        and worker_span["parent_span_id"] == f"{client.context.span_id:016x}"
    )


async def test_a_call_gets_a_client_span_with_its_worker(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    assert await pool.call("add", 1, 2, session="s1") == 3
    span = only(parent_spans(exporter, "corral.call add"))
    worker = pool.workers[0]
    assert span.kind is SpanKind.CLIENT
    assert span.attributes is not None
    assert span.attributes["corral.worker.id"] == worker.id
    assert span.attributes["corral.worker.pid"] == worker.pid
    assert span.attributes["corral.session"] == "s1"
    assert span.attributes["corral.pool"] == pool.name
    assert span.attributes["corral.outcome"] == "ok"
    assert span.status.status_code is StatusCode.UNSET


async def test_the_worker_continues_the_trace_in_a_server_span(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    await pool.call("add", 1, 2, session="s1")
    client = only(parent_spans(exporter, "corral.call add"))
    server = only(await worker_spans(pool, "corral.call add"))
    worker = pool.workers[0]
    assert server["kind"] == "SERVER"
    assert child_of(server, client)
    attributes = server["attributes"]
    assert attributes["corral.worker.id"] == worker.id
    assert attributes["corral.worker.pid"] == worker.pid
    assert attributes["corral.session"] == "s1"
    assert attributes["corral.outcome"] == "ok"
    assert attributes["rpc.method"] == "add"
    assert server["status"] == "UNSET"


async def test_the_client_span_is_a_child_of_the_callers_span(
    pool: Pool, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    with provider.get_tracer("myapp").start_as_current_span("request") as request:
        await pool.call("add", 1, 2)
    client = only(parent_spans(exporter, "corral.call add"))
    assert client.parent is not None
    assert client.parent.span_id == request.get_span_context().span_id
    assert client.context.trace_id == request.get_span_context().trace_id


async def test_a_failed_call_marks_both_spans_with_the_error_type(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(corral.RemoteError):
        await pool.call("fail", "boom")
    client = only(parent_spans(exporter, "corral.call fail"))
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes is not None
    assert client.attributes["error.type"] == "corral.RemoteError"
    assert client.attributes["corral.remote.type"] == "ValueError"
    assert client.attributes["corral.outcome"] == "error"
    assert [e.name for e in client.events] == ["exception"]
    server = only(await worker_spans(pool, "corral.call fail"))
    assert child_of(server, client)
    assert server["status"] == "ERROR"
    assert server["attributes"]["error.type"] == "ValueError"
    assert server["attributes"]["corral.outcome"] == "error"


async def test_a_failing_async_handler_marks_its_span(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(corral.RemoteError):
        await pool.call("async_fail", "k")
    server = only(await worker_spans(pool, "corral.call async_fail"))
    assert server["attributes"]["error.type"] == "KeyError"
    assert server["status"] == "ERROR"


async def test_a_result_that_cannot_be_sent_is_an_error_in_the_worker_span(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(corral.RemoteError):
        await pool.call("unencodable")
    server = only(await worker_spans(pool, "corral.call unencodable"))
    assert server["attributes"]["corral.outcome"] == "error"
    assert server["attributes"]["error.type"] == "TypeError"


async def test_a_timed_out_call_is_a_timeout_in_the_client_span(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(corral.CallTimeout):
        await pool.call("wait_cancelled", 5.0, timeout=0.1)
    await pool.wait_idle(timeout=10)
    client = only(parent_spans(exporter, "corral.call wait_cancelled"))
    assert client.attributes is not None
    assert client.attributes["corral.outcome"] == "timeout"
    assert client.attributes["error.type"] == "corral.CallTimeout"
    # The worker's outcome depends on timing: the parent's deadline passes first
    # and its Cancel may arrive before or after the handler returns.
    server = only(await worker_spans(pool, "corral.call wait_cancelled"))
    assert child_of(server, client)


async def test_a_cancelled_call_is_cancelled_in_both_spans(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    worker = pool.workers[0]
    task = asyncio.ensure_future(pool.call("announce_then_wait", 5.0))
    assert await pool._wait_until(lambda: "waiting in call" in worker.stderr_tail, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await pool.wait_idle(timeout=10)
    client = only(parent_spans(exporter, "corral.call announce_then_wait"))
    assert client.attributes is not None
    assert client.attributes["corral.outcome"] == "cancelled"
    assert client.status.status_code is StatusCode.UNSET
    server = only(await worker_spans(pool, "corral.call announce_then_wait"))
    assert server["attributes"]["corral.outcome"] == "cancelled"


async def test_a_stream_gets_a_client_span_and_a_server_child(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    assert [x async for x in pool.stream("count", 3)] == [0, 1, 2]
    client = only(parent_spans(exporter, "corral.stream count"))
    assert client.kind is SpanKind.CLIENT
    assert client.attributes is not None
    assert client.attributes["corral.outcome"] == "ok"
    server = only(await worker_spans(pool, "corral.stream count"))
    assert server["kind"] == "SERVER"
    assert child_of(server, client)


async def test_a_stream_stopped_early_is_cancelled_in_its_span(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    async with pool.stream("count", 1000) as items:
        async for _ in items:
            break
    client = only(parent_spans(exporter, "corral.stream count"))
    assert client.attributes is not None
    assert client.attributes["corral.outcome"] == "cancelled"


async def test_checkout_calls_are_traced(pool: Pool, exporter: InMemorySpanExporter) -> None:
    async with pool.checkout() as lease:
        assert await lease.call("add", 2, 2) == 4
    client = only(parent_spans(exporter, "corral.call add"))
    assert client.attributes is not None
    assert client.attributes["corral.worker.id"] == lease.id
    server = only(await worker_spans(pool, "corral.call add"))
    assert child_of(server, client)


@pytest.mark.parametrize(
    ("target", "method"),
    [
        ("tests.workers.observed:app", "nested_span_sync"),  # on the sync lane
        ("tests.workers.observed:app", "nested_span_async"),  # a task on the loop
        ("tests.workers.observed:inline_app", "nested_span_sync"),  # inline
    ],
)
async def test_spans_a_handler_opens_are_children_of_the_worker_span(
    provider: TracerProvider, target: str, method: str
) -> None:
    async with instrument(Pool(target, size=1, env=TRACING), tracer_provider=provider) as pool:
        assert await pool.call(method) == "done"
        server = only(await worker_spans(pool, f"corral.call {method}"))
        inner = only(await worker_spans(pool, "myapp.inner"))
    assert inner["trace_id"] == server["trace_id"]
    assert inner["parent_span_id"] == server["span_id"]


async def test_batched_worker_spans_are_flushed_by_the_documented_shutdown_hook(
    provider: TracerProvider, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    # The worker batches its spans (held for a minute) and flushes them only in
    # on_shutdown, as docs/observability.md advises: a worker ends with os._exit.
    span_file = tmp_path / "worker-spans.txt"
    env = {"CORRAL_TEST_SPAN_FILE": str(span_file)}
    async with instrument(Pool(TARGET, size=1, env=env), tracer_provider=provider) as pool:
        assert await pool.call("add", 1, 2) == 3
        assert not span_file.exists() or span_file.read_text() == ""  # still in the batch
    client = only(parent_spans(exporter, "corral.call add"))
    lines = span_file.read_text().splitlines()
    assert (
        f"corral.call add|SERVER|{client.context.trace_id:032x}|{client.context.span_id:016x}"
        in lines
    )


async def test_an_uninstrumented_pool_sends_no_trace_context(
    pool: Pool, exporter: InMemorySpanExporter
) -> None:
    uninstrument(pool)
    assert await pool.call("add", 1, 2) == 3
    assert exporter.get_finished_spans() == ()
    assert await pool.call("finished_spans") == []


async def test_a_worker_without_opentelemetry_still_serves_traced_calls(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    env = {"CORRAL_TEST_NO_OPENTELEMETRY": "1"}
    async with instrument(Pool(TARGET, size=1, env=env), tracer_provider=provider) as pool:
        assert await pool.call("add", 1, 2) == 3
        assert [x async for x in pool.stream("count", 2)] == [0, 1]
        assert await pool.call("opentelemetry_imported") is False
    assert len(parent_spans(exporter, "corral.call add")) == 1


async def test_nothing_imports_opentelemetry_unless_asked() -> None:
    script = (
        "import asyncio, sys\n"
        "import corral\n"
        "async def main():\n"
        "    async with corral.Pool('tests.workers.observed:app', size=1) as pool:\n"
        "        assert await pool.call('add', 1, 2) == 3\n"
        "        assert [x async for x in pool.stream('count', 2)] == [0, 1]\n"
        "        in_worker = await pool.call('opentelemetry_imported')\n"
        "    in_parent = any(m.split('.')[0] in ('opentelemetry', 'prometheus_client')\n"
        "                    for m in sys.modules)\n"
        "    print(in_parent, in_worker)\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 50)
    assert process.returncode == 0
    assert out.decode().splitlines()[-1].split() == ["False", "False"]  # after the logs


def test_a_call_frame_from_an_older_peer_has_no_trace_context() -> None:
    older = msgspec.msgpack.encode([2, 7, "add", [1, 2], {}, None, None, False, 0])
    call = msgspec.msgpack.decode(older, type=Call)
    assert call.trace is None
    traced = Call(7, "add", (1, 2), trace="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(traced), type=Call) == traced


def test_instrument_takes_only_a_pool() -> None:
    with pytest.raises(TypeError, match=r"corral\.Pool"):
        instrument("not a pool")  # type: ignore[arg-type]
