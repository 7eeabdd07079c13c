"""The worker's event loop: read calls, run handlers, answer, keep sessions.

Owns: dispatch of every parent-bound frame inside one worker process; where each
handler runs; stream credit, deadlines, cancellation and per-session state.
Must not touch: how the process was started or its descriptors (``__main__``
does that), or anything of the parent's.

Where handlers run:
- a sync handler runs inline, on the loop's thread, when nothing else is in
  flight (the fast path: no thread hop); while async work is in flight it runs
  on the sync lane, one thread, so the loop stays free for that work. Either
  way sync handlers run one at a time.
- async handlers and async generators run as tasks on the loop; sync
  generators step on the sync lane.
- a control thread reads the control pipe: it answers Ping at once and marks
  cancelled calls, even while a sync handler keeps the loop busy.

Rules it keeps (docs/protocol.md): every Call ends with exactly one of Result,
Error, End or CancelAck; every Cancel gets exactly one CancelAck, sent after the
call has really stopped, and it is the last frame of that call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._errors import EncodeError, PayloadTooLarge, ProtocolError
from .._framing import FrameDecoder, FrameEncoder
from .._log import get_logger
from .._messages import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    CancelAck,
    Chunk,
    Credit,
    End,
    EndSession,
    Error,
    ErrorKind,
    Hello,
    Ping,
    Pong,
    Result,
    Shutdown,
    WorkerBound,
)
from .._shm import LargeBuffers
from .._transport import BlockingFrameWriter, open_frame_reader
from . import _tracing
from ._app import App, Context, Handler, HandlerKind
from ._outcomes import describe, refusal_of

__all__ = ["WorkerRuntime", "run_hooks", "serve"]

_DONE = object()
_EAGER_TASKS = sys.version_info >= (3, 12)
_set_running_loop = asyncio.events._set_running_loop


class _Running:
    __slots__ = (
        "call",
        "cancel_requested",
        "credit",
        "credit_event",
        "ctx",
        "error_type",
        "job",
        "outcome",
        "span",
        "span_context",
        "stop_reason",
        "task",
        "timer",
    )

    def __init__(self, call: Call, ctx: Context) -> None:
        self.call = call
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.job: concurrent.futures.Future[Any] | None = None  # sync work on the lane
        self.cancel_requested = False  # a Cancel came: a CancelAck is owed
        self.stop_reason: str | None = None  # "cancel", "deadline" or "shutdown"
        self.timer: asyncio.TimerHandle | None = None
        self.credit = call.window
        self.credit_event: asyncio.Event | None = None
        # Set only on failure paths, and read only when the call is traced:
        self.outcome: str | None = None  # "error" or "timeout"; None: ok so far
        self.error_type: str | None = None
        self.span: Any = None  # the call's OpenTelemetry span, when it carried a traceparent
        self.span_context: contextvars.Context | None = None  # the handler runs in it


async def run_hooks(
    hooks: list[Callable[..., Any]],
    *args: Any,
    run_sync: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
) -> None:
    """Run lifecycle hooks in order; async ones are awaited.

    Sync hooks go through ``run_sync`` when given, so they run on the same
    thread as the sync handlers (objects they make stay usable there).
    """
    for hook in hooks:
        if run_sync is not None and not inspect.iscoroutinefunction(hook):
            outcome = await run_sync(functools.partial(hook, *args))
        else:
            outcome = hook(*args)
        if inspect.isawaitable(outcome):
            await outcome


class WorkerRuntime:
    """Serves one App until Shutdown or the parent goes away."""

    def __init__(
        self, app: App, worker_id: str, writer: BlockingFrameWriter, encoder: FrameEncoder
    ) -> None:
        self.app = app
        self.worker_id = worker_id
        self.sessions: dict[str, dict[str, Any]] = {}
        self._writer = writer
        self._append = encoder.append
        self._out = bytearray()  # whole frames not yet written
        self._out_lock = threading.Lock()  # guards _out and keeps frames in order
        self._flush_scheduled = False
        self._in_batch = False
        # Shared with the control thread, under _lock:
        self._lock = threading.Lock()
        self._running: dict[int, _Running] = {}
        self._max_seen_id = 0
        self._early_cancels: set[int] = set()
        # Loop thread only. All sync user code runs on one thread: the loop's
        # (inline) when the app has no async handlers, else the sync lane's.
        self._inline_sync = app.sync_mode == "inline" or (
            app.sync_mode == "auto" and not app.has_async_handlers
        )
        self._lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="corral-sync")
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._shutdown_requested = False
        self._log = get_logger("corral.worker").bind(worker_id=worker_id, pid=os.getpid())

    # --- output -----------------------------------------------------------------

    def _send(self, message: Any) -> None:
        """Queue a frame; written at the end of this batch or loop tick."""
        with self._out_lock:
            self._append(message, self._out)
        if not self._in_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame (from any thread)."""
        self._flush_scheduled = False
        with self._out_lock:
            if not self._out:
                return
            data, self._out = self._out, bytearray()
            try:
                self._writer.write(data)
            except OSError:
                self._parent_gone()

    def _parent_gone(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._stopped.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stopped.set)

    def _send_value(self, call_id: int, value: Any, method: str, chunk: bool = False) -> str | None:
        """Send a Result (or Chunk); if it cannot be sent, an Error instead.

        Returns None if sent, else the type named in the Error.
        """
        try:
            self._send(Chunk(call_id, value) if chunk else Result(call_id, value))
        except EncodeError as exc:
            what = "an item yielded by" if chunk else "the result of"
            self._send(
                Error(
                    call_id,
                    ErrorKind.ENCODE,
                    "TypeError",
                    f"{what} {method!r} cannot be encoded: type "
                    f"{type(value).__qualname__} is not supported ({exc.__cause__ or exc})",
                )
            )
            return "TypeError"
        except PayloadTooLarge as exc:
            self._send(Error(call_id, ErrorKind.TOO_LARGE, "PayloadTooLarge", str(exc)))
            return "PayloadTooLarge"
        return None

    def _send_result(self, running: _Running, value: Any) -> None:
        failure = self._send_value(running.call.id, value, running.call.method)
        if failure is not None:
            running.outcome, running.error_type = "error", failure

    def _send_error(self, call_id: int, kind: str, exc: BaseException) -> str:
        """Send an Error for ``exc``; returns the type it names."""
        name, message, tb = describe(exc)
        self._send(Error(call_id, kind, name, message, tb))
        return name

    # --- FrameListener (loop thread) ------------------------------------------

    def frame_received(self, message: WorkerBound) -> None:
        self._in_batch = True
        if isinstance(message, Call):
            self._start(message)
        elif isinstance(message, Credit):
            self._add_credit(message.id, message.n)
        elif isinstance(message, EndSession):
            self._end_session(message.session)
        elif isinstance(message, Shutdown):
            self._shutdown_requested = True
            self._stopped.set()
        elif isinstance(message, Ping):  # in-band, when no control channel is used
            self._send(Pong(message.seq))
        elif isinstance(message, Cancel):
            self.cancel_requested(message.id)

    def frames_done(self) -> None:
        self._in_batch = False
        self.flush()

    def connection_broken(self, error: ProtocolError | None) -> None:
        if error is not None:
            self._log.error("worker.protocol_error", error=str(error))
        self._stopped.set()

    # --- calls (loop thread) --------------------------------------------------

    def _refusal(self, call: Call, handler: Handler | None) -> Error | None:
        """Why this call cannot start, as its Error frame; None if it can."""
        return refusal_of(self.app, call, handler)

    def _start(self, call: Call) -> None:
        handler = self.app.handlers.get(call.method)
        refusal = self._refusal(call, handler)
        # One locked step, so a Cancel read by the control thread meanwhile sees
        # this call either not yet arrived, or registered, or answered: never between.
        with self._lock:
            self._max_seen_id = max(self._max_seen_id, call.id)
            if self._early_cancels and call.id in self._early_cancels:
                self._early_cancels.discard(call.id)  # cancelled before it arrived
                self._send(CancelAck(call.id))
                return
            if refusal is not None or handler is None:
                self._send(refusal)
                return
            session = None
            if call.session is not None:
                session = self.sessions.get(call.session)
                if session is None:
                    session = self.sessions[call.session] = {}
            ctx = Context(
                call_id=call.id,
                method=call.method,
                worker_id=self.worker_id,
                session_id=call.session,
                session=session,
                deadline=None if call.timeout is None else time.monotonic() + call.timeout,
            )
            running = _Running(call, ctx)
            self._running[call.id] = running
        if call.trace is not None:
            self._start_span(running)
        kind = handler.kind
        if kind is HandlerKind.SYNC and self._inline_sync:
            self._run_inline(running, handler)
            return
        if call.timeout is not None:
            running.timer = self._loop.call_later(call.timeout, self._deadline_passed, running)
        coro = self._run(running, handler)
        context = running.span_context
        if _EAGER_TASKS:
            running.task = asyncio.Task(coro, loop=self._loop, eager_start=True, context=context)  # type: ignore[call-arg]
        elif context is None:
            running.task = self._loop.create_task(coro)
        else:
            running.task = self._loop.create_task(coro, context=context)

    def _start_span(self, running: _Running) -> None:
        """The call carries trace context: open its span, if OpenTelemetry is here."""
        tracing = _tracing.tracing()
        if tracing is not None:
            running.span, running.span_context = tracing.start(running.call, self.worker_id)

    def _end_span(self, running: _Running) -> None:
        tracing = _tracing.tracing()
        assert tracing is not None
        stop = running.stop_reason
        if running.cancel_requested or stop in ("cancel", "shutdown"):
            outcome, error_type = "cancelled", None
        elif stop == "deadline" or running.outcome == "timeout":
            outcome, error_type = "timeout", "TimeoutError"
        else:
            outcome, error_type = running.outcome or "ok", running.error_type
        tracing.end(running.span, outcome, error_type)

    def _run_inline(self, running: _Running, handler: Handler) -> None:
        """The fast path: run a sync handler right here, on the loop's thread."""
        if self._out:
            self.flush()  # earlier results must not wait for this handler
        call = running.call
        kwargs = {**call.kwargs, "ctx": running.ctx} if handler.wants_context else call.kwargs
        fn = functools.partial(handler.fn, *call.args, **kwargs)
        try:
            if running.span_context is None:
                value = self._outside_loop(fn)
            else:
                value = running.span_context.run(self._outside_loop, fn)
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's RemoteError
            running.outcome = "error"
            if not running.cancel_requested:
                running.error_type = self._send_error(call.id, ErrorKind.REMOTE, exc)
        else:
            self._send_return(running, value)
        finally:
            self._finish(running)

    def _send_return(self, running: _Running, value: Any) -> None:
        """A handler's return value, or a timeout if its deadline has passed.

        Checked here, not only by the deadline timer: a handler may return after
        its deadline but before the loop has run that timer.
        """
        deadline = running.ctx.deadline
        if running.stop_reason == "deadline" or (
            deadline is not None and time.monotonic() >= deadline
        ):
            running.outcome = "timeout"
            self._send_late(running.call.id)  # too late to count: the caller has timed out
        else:
            self._send_result(running, value)

    def _send_late(self, call_id: int) -> None:
        self._send(
            Error(call_id, ErrorKind.TIMEOUT, "TimeoutError", "deadline passed in the worker")
        )

    async def _run(self, running: _Running, handler: Handler) -> None:
        call = running.call
        kwargs = {**call.kwargs, "ctx": running.ctx} if handler.wants_context else call.kwargs
        kind = handler.kind
        try:
            if kind is HandlerKind.ASYNC:
                value = await handler.fn(*call.args, **kwargs)
                self._send_return(running, value)
            elif kind is HandlerKind.SYNC:
                value = await self._on_lane(
                    running, functools.partial(handler.fn, *call.args, **kwargs)
                )
                self._send_return(running, value)
            elif kind is HandlerKind.ASYNC_GEN:
                agen = handler.fn(*call.args, **kwargs)
                try:
                    async for item in agen:
                        if not await self._emit(running, item):
                            break
                    else:
                        self._send(End(call.id))
                finally:
                    await agen.aclose()
            else:
                gen = await self._on_lane(
                    running, functools.partial(handler.fn, *call.args, **kwargs)
                )
                try:
                    while (item := await self._on_lane(running, next, gen, _DONE)) is not _DONE:
                        if not await self._emit(running, item):
                            break
                    else:
                        self._send(End(call.id))
                finally:
                    await self._on_lane(running, gen.close, check=False)
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise  # not ours: the worker's loop is going away
            if running.stop_reason == "deadline" and not running.cancel_requested:
                self._send(
                    Error(
                        call.id, ErrorKind.TIMEOUT, "TimeoutError", "deadline passed in the worker"
                    )
                )
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's RemoteError
            running.outcome = "error"
            if not running.cancel_requested:
                running.error_type = self._send_error(call.id, ErrorKind.REMOTE, exc)
        finally:
            self._finish(running)

    def _outside_loop(self, fn: Callable[[], Any]) -> Any:
        """Run user code inline, with no running loop visible to it.

        So that a sync handler may call ``asyncio.run()`` as it could in any
        script; the loop is restored before anything else runs.
        """
        _set_running_loop(None)
        try:
            return fn()
        finally:
            _set_running_loop(self._loop)

    async def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run sync code outside any call, on the thread sync handlers use."""
        if self._inline_sync:
            return self._outside_loop(fn)
        return await asyncio.wrap_future(self._lane.submit(fn))

    async def _on_lane(
        self, running: _Running, fn: Callable[..., Any], *args: Any, check: bool = True
    ) -> Any:
        """Run sync code where this worker runs it: inline, or on the sync lane.

        A call stopped before its code starts never runs it.
        """
        if check and running.stop_reason is not None:
            raise asyncio.CancelledError
        if self._inline_sync:
            return self._outside_loop(functools.partial(fn, *args))
        if running.span_context is None:
            job = self._lane.submit(fn, *args)
        else:  # the handler's code sees the call's span as the current one
            job = self._lane.submit(contextvars.copy_context().run, fn, *args)
        running.job = job
        try:
            return await asyncio.wrap_future(job)
        finally:
            running.job = None

    async def _emit(self, running: _Running, item: Any) -> bool:
        """Send one stream item, waiting for credit first. False if it could not be sent."""
        if running.call.window:
            while running.credit <= 0:
                if running.stop_reason is not None:
                    raise asyncio.CancelledError  # no credit will come for a stopped call
                if running.credit_event is None:
                    running.credit_event = asyncio.Event()
                running.credit_event.clear()
                await running.credit_event.wait()
            running.credit -= 1
        failure = self._send_value(running.call.id, item, running.call.method, chunk=True)
        if failure is None:
            return True
        running.outcome, running.error_type = "error", failure
        return False

    def _add_credit(self, call_id: int, n: int) -> None:
        running = self._running.get(call_id)
        if running is not None:
            running.credit += n
            if running.credit_event is not None:
                running.credit_event.set()

    def _finish(self, running: _Running) -> None:
        """The call is over: say so once (CancelAck if it was cancelled)."""
        call_id = running.call.id
        with self._lock:
            if self._running.pop(call_id, None) is None:
                return
            owed = running.cancel_requested
        if running.timer is not None:
            running.timer.cancel()
        if running.span is not None:
            self._end_span(running)
        if owed:
            self._send(CancelAck(call_id))
        if not self._running and self._shutdown_requested:
            self._stopped.set()

    def _stop_call(self, running: _Running, reason: str) -> None:
        """Stop a call: async work is cancelled now; sync work is asked to stop."""
        if running.stop_reason is None:
            running.stop_reason = reason
        running.ctx._cancel()
        if running.credit_event is not None:
            running.credit_event.set()  # a stream waiting for credit sees the stop
        job = running.job
        if job is not None and not job.cancel():
            return  # running on the lane: it ends when the handler returns
        task = running.task
        if task is not None and not task.done():
            task.cancel()
            # A task cancelled before its first step never runs its body (nor its
            # finally): finish it from here in that case.
            task.add_done_callback(lambda _: self._finish(running))

    def _deadline_passed(self, running: _Running) -> None:
        running.timer = None
        if running.call.id in self._running:
            self._stop_call(running, "deadline")

    # --- cancellation (any thread) ----------------------------------------------

    def cancel_requested(self, call_id: int) -> None:
        """A Cancel arrived (on the control thread, or in-band on the loop)."""
        with self._lock:
            running = self._running.get(call_id)
            if running is None:
                if call_id > self._max_seen_id:
                    self._early_cancels.add(call_id)  # its Call is still on the way
                    return
            else:
                if running.cancel_requested:
                    return
                running.cancel_requested = True
                running.ctx._cancel()  # a sync handler sees it now, even mid-call
        if running is None:
            # Already finished: its last frame is queued or written; the ack follows it.
            with self._out_lock:
                self._append(CancelAck(call_id), self._out)
            self.flush()
        elif threading.current_thread() is threading.main_thread():
            self._stop_call(running, "cancel")
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop_call, running, "cancel")

    def control_loop(self, fd: int, max_message_size: int) -> None:
        """Body of the control thread: Ping and Cancel, answered while the loop is busy."""
        decoder: FrameDecoder[Any] = FrameDecoder(WorkerBound, max_message_size)  # type: ignore[arg-type]
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return  # the pool is gone; the main pipe says so too
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                self._log.error("worker.control_protocol_error", error=str(exc))
                self._parent_gone()
                return
            for message in messages:
                if isinstance(message, Ping):
                    try:
                        self._writer.send_now(Pong(message.seq))
                    except OSError:
                        self._parent_gone()
                        return
                elif isinstance(message, Cancel):
                    self.cancel_requested(message.id)

    # --- sessions ---------------------------------------------------------------

    def _end_session(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        if state is not None and self.app.session_end_hooks:
            self._loop.create_task(self._session_ended(session_id, state))

    async def _session_ended(self, session_id: str, state: dict[str, Any]) -> None:
        try:
            await run_hooks(self.app.session_end_hooks, session_id, state, run_sync=self.run_sync)
        except Exception:  # noqa: BLE001 - logged with its traceback; the worker goes on
            self._log.exception("worker.session_end_hook_failed", session=session_id)

    # --- lifecycle --------------------------------------------------------------

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, *, graceful: bool) -> None:
        """End every call (waiting for them if graceful). The lane stays up for the
        ``on_shutdown`` hooks; ``close()`` releases it."""
        if graceful:
            while self._running:
                self._stopped.clear()
                await self._stopped.wait()
        for running in list(self._running.values()):
            self._stop_call(running, "shutdown")
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self.flush()

    def close(self) -> None:
        """Release the sync lane; sync work still queued there never runs."""
        self._lane.shutdown(wait=False, cancel_futures=True)


async def serve(
    app: App,
    worker_id: str,
    read_fd: int,
    write_fd: int,
    max_message_size: int,
    control_fd: int | None = None,
    large_buffers: LargeBuffers | None = None,
    stream: tuple[int, str | None] | None = None,
) -> int:
    """Run the worker until told to stop; returns the process exit code.

    With ``large_buffers``, arguments and results over its threshold travel
    through shared-memory segments (``corral._shm``); with ``stream``
    (threshold, compression), over a socket, after their frames
    (``corral._streamed``).
    """
    log = get_logger("corral.worker").bind(worker_id=worker_id, pid=os.getpid())
    if stream is None:
        encoder = FrameEncoder(max_message_size, large_buffers)
        writer = BlockingFrameWriter(write_fd, encoder)
        decoder: FrameDecoder[Any] = FrameDecoder(WorkerBound, max_message_size, large_buffers)  # type: ignore[arg-type]
    else:
        from .._streamed import StreamFrameDecoder, StreamFrameEncoder, StreamingBlockingWriter

        encoder = streaming = StreamFrameEncoder(max_message_size)
        streaming.enable(*stream)
        writer = StreamingBlockingWriter(write_fd, streaming)
        # The loop reads this socket: buffers are copied from its reads, once.
        decoder = StreamFrameDecoder(WorkerBound, max_message_size)  # type: ignore[arg-type]
    runtime = WorkerRuntime(app, worker_id, writer, encoder)
    reader = await open_frame_reader(read_fd, runtime, decoder)
    if control_fd is not None:
        threading.Thread(
            target=runtime.control_loop,
            args=(control_fd, max_message_size),
            name="corral-control",
            daemon=True,
        ).start()
    exit_code = 0
    try:
        try:
            await run_hooks(app.startup_hooks, run_sync=runtime.run_sync)
        except Exception:
            # reported on stderr; the pool turns it into WorkerStartError
            log.exception("worker.startup_failed")
            return 4
        runtime._send(Hello(PROTOCOL_VERSION, os.getpid(), worker_id, sorted(app.handlers)))
        runtime.flush()
        await runtime.wait_stopped()
        await runtime.stop(graceful=runtime._shutdown_requested)
        try:
            await run_hooks(app.shutdown_hooks, run_sync=runtime.run_sync)
        except Exception:
            # reported on stderr; the worker still exits
            log.exception("worker.shutdown_hook_failed")
            exit_code = 5
    finally:
        runtime.close()
        reader.close()
        with contextlib.suppress(OSError):
            writer.close()
    return exit_code
