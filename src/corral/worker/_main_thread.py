"""The worker's hot path: the main thread reads calls and runs sync handlers itself.

Owns: dispatch of every parent-bound frame inside one worker process (for apps
with ``sync_mode`` "auto" or "inline"); where each handler runs; stream credit,
deadlines, cancellation and per-session state. Must not touch: how the process
was started or its descriptors (``__main__`` does that), or anything of the
parent's. ``sync_mode="thread"`` apps are served by ``_runtime`` instead.

Threads (decision 0020):
- the main thread reads the main pipe with blocking reads, decodes every frame
  of a read in one pass, runs sync handlers and steps sync generators inline,
  and writes the replies of one read in one write: no event loop and no thread
  hop on the path of a sync call;
- async handlers and async generators run as tasks on an event loop of their
  own thread (``corral-async``), started only if the app has async code; when
  that loop is idle the main thread runs a call's first step itself and hands
  the task over only if it suspends (decision 0028), else it hands the call
  over; the loop thread writes the replies of what it runs;
- the control thread reads the control pipe: it answers Ping at once and marks
  cancelled calls, even while a sync handler runs.

Rules it keeps (docs/protocol.md): every Call ends with exactly one of Result,
Error, End or CancelAck; every Cancel gets exactly one CancelAck, sent after the
call has really stopped, and it is the last frame of that call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._blocking_writer import BlockingFrameWriter
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
from . import _tracing
from ._app import App, Context, Handler, HandlerKind
from ._outcomes import describe, refusal_of

if TYPE_CHECKING:
    import asyncio

    from .._shm import LargeBuffers
    from ._loop_thread import LoopThread

__all__ = ["MainThreadRuntime", "serve"]

_DONE = object()
_READ_SIZE = 1 << 16
_SYNC = HandlerKind.SYNC
_SYNC_GEN = HandlerKind.SYNC_GEN


class _Running:
    """One call in this worker, from its Call frame to its last frame.

    Class attributes are the defaults: a call stores only what it changes, so
    the common call (a sync handler, no deadline) costs two stores.
    """

    on_loop = False  # async code: runs on the loop thread
    task: asyncio.Task[None] | None = None  # on the loop thread
    gen: Any = None  # a sync generator being streamed by the main thread
    cancel_requested = False  # a Cancel came: a CancelAck is owed
    stop_reason: str | None = None  # "cancel", "deadline" or "shutdown"
    timer: asyncio.TimerHandle | None = None
    credit_event: asyncio.Event | None = None
    # Set only on failure paths, and read only when the call is traced:
    outcome: str | None = None  # "error" or "timeout"; None: ok so far
    error_type: str | None = None
    span: Any = None  # the call's OpenTelemetry span, when it carried a traceparent
    span_context: contextvars.Context | None = None  # the handler runs in it

    def __init__(self, call: Call, ctx: Context) -> None:
        self.call = call
        self.ctx = ctx
        self.credit = call.window


class MainThreadRuntime:
    """Serves one App on the main thread until Shutdown or the parent goes away."""

    def __init__(
        self,
        app: App,
        worker_id: str,
        read_fd: int,
        writer: BlockingFrameWriter,
        encoder: FrameEncoder,
        decoder: FrameDecoder[Any],
    ) -> None:
        self.app = app
        self.worker_id = worker_id
        self.sessions: dict[str, dict[str, Any]] = {}  # main thread only
        self._read_fd = read_fd
        self._decoder = decoder
        self._writer = writer
        self._append = encoder.append
        self._out = bytearray()  # whole frames not yet written
        self._out_lock = threading.Lock()  # guards _out and keeps frames in order
        self._main = threading.get_ident()
        # Shared with the control and loop threads, under _lock:
        self._lock = threading.Lock()
        self._running: dict[int, _Running] = {}
        self._max_seen_id = 0
        self._early_cancels: set[int] = set()
        self._spans_open = 0  # traced calls in flight: their replies wait for the span's end
        # Main thread only:
        self._parked: dict[int, _Running] = {}  # sync streams waiting for credit
        self._stepping = False  # an async call's first step runs here (LoopThread)
        self._shutdown_requested = False
        self._reading = True
        # Set from any thread; the wake pipe interrupts the main thread's wait:
        self._parent_lost = False
        self._stopping = False  # no more reading: the loop thread says when it is idle
        self._idle = threading.Event()
        self._wake_fds: tuple[int, int] | None = None  # made when the main thread first waits
        self._wake_pair: tuple[Any, ...] = ()  # the sockets behind _wake_fds
        # The loop thread, started for async code only:
        self._async: LoopThread | None = None
        self._log = get_logger("corral.worker").bind(worker_id=worker_id, pid=os.getpid())

    # --- output ----------------------------------------------------------------

    def _send(self, message: Any) -> None:
        """Queue a frame: the main thread writes at the end of its read; the loop
        thread at once when one call is in flight, else at the end of its tick
        (frames from calls that end in one tick go out in one write)."""
        with self._out_lock:
            self._append(message, self._out)
        if threading.get_ident() != self._main:
            if len(self._running) <= 1 and not self._spans_open:
                self.flush()  # one call in flight: nothing to coalesce with
            elif self._async is not None:
                self._async.flush_soon()
        elif self._stepping and len(self._running) <= 1 and not self._spans_open:
            self.flush()  # as on the loop thread: an async first step may block after it

    def flush(self) -> None:
        """Write every queued frame (from any thread)."""
        with self._out_lock:
            if not self._out:
                return
            data, self._out = self._out, bytearray()
            try:
                self._writer.write(data)
            except OSError:
                self._parent_gone()

    def _parent_gone(self) -> None:
        self._parent_lost = True
        self._wake()

    def _wake(self) -> None:
        """Interrupt the main thread's wait, if it waits on the wake pipe."""
        fds = self._wake_fds
        if fds is not None:  # None: the main thread is not waiting on it, and checks first
            with contextlib.suppress(OSError):
                os.write(fds[1], b"w")

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

    def _send_error(self, call_id: int, kind: str, exc: BaseException) -> str:
        """Send an Error for ``exc``; returns the type it names."""
        name, message, tb = describe(exc)
        self._send(Error(call_id, kind, name, message, tb))
        return name

    def _send_return(self, running: _Running, value: Any) -> None:
        """A handler's return value, or a timeout if its deadline has passed.

        Checked here, not only by a timer: a handler may return after its
        deadline but before anything else has noticed.
        """
        deadline = running.ctx.deadline
        if running.stop_reason == "deadline" or (
            deadline is not None and time.monotonic() >= deadline
        ):
            running.outcome = "timeout"
            self._send_late(running.call.id)  # too late to count: the caller has timed out
            return
        failure = self._send_value(running.call.id, value, running.call.method)
        if failure is not None:
            running.outcome, running.error_type = "error", failure

    def _send_late(self, call_id: int) -> None:
        self._send(
            Error(call_id, ErrorKind.TIMEOUT, "TimeoutError", "deadline passed in the worker")
        )

    # --- the main thread's read loop ---------------------------------------------

    def serve_forever(self) -> bool:
        """Read and dispatch frames until told to stop; True if the stop is graceful."""
        read, fd = os.read, self._read_fd
        decoder = self._decoder
        dispatch, start = self._dispatch, self._start
        while self._reading:
            if self._parent_lost:
                return False
            if (self._parked or self._shutdown_requested) and not self._wait_readable():
                continue
            try:
                data = read(fd, _READ_SIZE)
            except OSError:
                return False
            if not data:
                if decoder.buffered:
                    error = f"stream ended inside a frame ({decoder.buffered} bytes)"
                    self._log.error("worker.protocol_error", error=error)
                return self._shutdown_requested
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                self._log.error("worker.protocol_error", error=str(exc))
                return False
            for message in messages:
                if type(message) is Call:
                    start(message)
                else:
                    dispatch(message)
            # Held no longer while the next read blocks: a large argument's
            # segment goes as soon as its call is done, so its sender reuses it.
            message = messages = None  # type: ignore[assignment]
            if self._out:
                self.flush()
            failed = decoder.failed  # after frames that arrived whole (a lost segment)
            if failed is not None:
                self._log.error("worker.protocol_error", error=str(failed))
                return False
        return True

    def _wait_readable(self) -> bool:
        """The slow path: wait for the main pipe, a wake-up or a parked stream's
        deadline. True if the main pipe can be read.

        The wake pipe is made on first use (a worker that never streams nor
        shuts down with calls in flight has none); everything it could have
        signalled before it existed is checked before waiting.
        """
        if self._wake_fds is None:
            import socket  # a socket pair, not a pipe: the worker's pipes are its protocol's

            self._wake_pair = socket.socketpair()
            self._wake_fds = (self._wake_pair[0].fileno(), self._wake_pair[1].fileno())
        self._step_stopped_streams()
        if self._shutdown_requested and not self._running:
            self._reading = False
            return False
        timeout = None
        now = time.monotonic()
        for running in self._parked.values():
            deadline = running.ctx.deadline
            if deadline is not None:
                left = max(0.0, deadline - now)
                timeout = left if timeout is None else min(timeout, left)
        wake = self._wake_fds[0]
        readable, _, _ = select.select((self._read_fd, wake), (), (), timeout)
        if wake in readable:
            with contextlib.suppress(OSError):
                os.read(wake, 4096)
        self._step_stopped_streams()
        return self._read_fd in readable

    def _step_stopped_streams(self) -> None:
        """Finish the parked streams that were stopped or ran out of time: they need no credit."""
        for running in list(self._parked.values()):
            if running.stop_reason is not None or running.ctx.cancelled:
                self._parked.pop(running.call.id, None)
                self._pump(running)
        if self._out:
            self.flush()

    def _dispatch(self, message: WorkerBound) -> None:
        if isinstance(message, Call):
            self._start(message)
        elif isinstance(message, Credit):
            self._add_credit(message.id, message.n)
        elif isinstance(message, EndSession):
            self._end_session(message.session)
        elif isinstance(message, Shutdown):
            self._shutdown_requested = True
        elif isinstance(message, Ping):  # in-band, when no control channel is used
            self._send(Pong(message.seq))
        elif isinstance(message, Cancel):
            self.cancel_requested(message.id)

    # --- calls (main thread) --------------------------------------------------

    def _refusal(self, call: Call, handler: Handler | None) -> Error | None:
        """Why this call cannot start, as its Error frame; None if it can."""
        return refusal_of(self.app, call, handler)

    def _start(self, call: Call) -> None:
        handler = self.app.handlers.get(call.method)
        refusal = None
        if handler is None or call.timeout is not None or (handler.streams and not call.stream):
            refusal = self._refusal(call, handler)
        # One locked step, so a Cancel read by the control thread meanwhile sees
        # this call either not yet arrived, or registered, or answered: never between.
        with self._lock:
            if call.id > self._max_seen_id:
                self._max_seen_id = call.id
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
            ctx = Context(  # positional: keywords cost more than the rest of this block
                call.id,
                call.method,
                self.worker_id,
                call.session,
                session,
                None if call.timeout is None else time.monotonic() + call.timeout,
            )
            running = _Running(call, ctx)
            self._running[call.id] = running
            kind = handler.kind
            if kind is not _SYNC and kind is not _SYNC_GEN:
                running.on_loop = True
        if call.trace is not None:
            self._start_span(running)
        if kind is _SYNC:
            self._run_inline(running, handler)
        elif kind is _SYNC_GEN:
            self._start_stream(running, handler)
        else:
            self.ensure_loop().start_call(running, handler)

    def _start_span(self, running: _Running) -> None:
        """The call carries trace context: open its span, if OpenTelemetry is here."""
        tracing = _tracing.tracing()
        if tracing is not None:
            running.span, running.span_context = tracing.start(running.call, self.worker_id)
            with self._lock:
                # Its reply is written at the end of the tick, after _finish ends
                # the span: whoever reads the spans after the reply sees this one.
                self._spans_open += 1

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

    def _user(self, running: _Running, fn: Callable[..., Any], *args: Any) -> Any:
        """Run user code on this thread, in the call's span context if it has one."""
        if running.span_context is None:
            return fn(*args)
        return running.span_context.run(fn, *args)

    def _run_inline(self, running: _Running, handler: Handler) -> None:
        """The fast path: run a sync handler right here, on the main thread.

        Its result is written at once, before the call leaves the registry, so
        a CancelAck for it (sent by whichever thread sees it finished) follows.
        """
        if self._out:
            self.flush()  # earlier results must not wait for this handler
        call = running.call
        kwargs = {**call.kwargs, "ctx": running.ctx} if handler.wants_context else call.kwargs
        try:
            if running.span_context is None:
                value = handler.fn(*call.args, **kwargs) if kwargs else handler.fn(*call.args)
            else:
                value = running.span_context.run(handler.fn, *call.args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's RemoteError
            running.outcome = "error"
            if not running.cancel_requested:
                running.error_type = self._send_error(call.id, ErrorKind.REMOTE, exc)
            self.flush()
        else:
            if running.ctx.deadline is None and running.stop_reason is None:
                frame = bytearray()
                try:
                    self._append(Result(call.id, value), frame)
                except (EncodeError, PayloadTooLarge):
                    self._send_return(running, value)  # says why, in an Error
                    self.flush()
                else:
                    try:
                        self._writer.write(frame)
                    except OSError:
                        self._parent_gone()
            else:
                self._send_return(running, value)
                self.flush()
        self._finish(running)

    # --- sync streams (main thread) ---------------------------------------------

    def _start_stream(self, running: _Running, handler: Handler) -> None:
        call = running.call
        kwargs = {**call.kwargs, "ctx": running.ctx} if handler.wants_context else call.kwargs
        try:
            running.gen = self._user(running, functools.partial(handler.fn, *call.args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's RemoteError
            running.outcome = "error"
            running.error_type = self._send_error(call.id, ErrorKind.REMOTE, exc)
            self._finish(running)
            return
        self._pump(running)

    def _pump(self, running: _Running) -> None:
        """Step a sync generator while it has credit; park it when it has none.

        Each item is written as soon as it is made. A stopped stream (cancel,
        deadline, shutdown) is closed and finished here.
        """
        call = running.call
        window = call.window
        ended = False
        try:
            while True:
                if running.stop_reason is None and running.ctx.cancelled:
                    running.stop_reason = "cancel" if running.cancel_requested else "deadline"
                if running.stop_reason is not None:
                    if running.stop_reason == "deadline" and not running.cancel_requested:
                        running.outcome = "timeout"
                        self._send_late(call.id)
                    break
                if window and running.credit <= 0:
                    self._parked[call.id] = running
                    self.flush()
                    return
                item = self._user(running, next, running.gen, _DONE)
                if item is _DONE:
                    ended = True
                    self._send(End(call.id))
                    break
                if window:
                    running.credit -= 1
                failure = self._send_value(call.id, item, call.method, chunk=True)
                self.flush()
                if failure is not None:
                    running.outcome, running.error_type = "error", failure
                    break
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's RemoteError
            running.outcome = "error"
            if not running.cancel_requested:
                running.error_type = self._send_error(call.id, ErrorKind.REMOTE, exc)
            ended = True
        if not ended:
            try:
                self._user(running, running.gen.close)
            except Exception as exc:  # noqa: BLE001 - a failing close() is the caller's error
                running.outcome = "error"
                if not running.cancel_requested and running.stop_reason is None:
                    running.error_type = self._send_error(call.id, ErrorKind.REMOTE, exc)
        self._finish(running)

    def _add_credit(self, call_id: int, n: int) -> None:
        running = self._running.get(call_id)
        if running is None:
            return
        if running.on_loop:
            if self._async is not None:
                self._async.add_credit(running, n)
            return
        running.credit += n
        if running.credit > 0 and self._parked.pop(call_id, None) is not None:
            self._pump(running)

    def ensure_loop(self) -> LoopThread:
        """The loop thread for async code, started on first use (asyncio with it)."""
        if self._async is None:
            from ._loop_thread import LoopThread

            self._async = LoopThread(self)
        return self._async

    # --- the end of a call (any thread) -------------------------------------------

    def _finish(self, running: _Running) -> None:
        """The call is over: say so once (CancelAck if it was cancelled)."""
        call_id = running.call.id
        with self._lock:
            if self._running.pop(call_id, None) is None:
                return
            owed = running.cancel_requested
            idle = not self._running
        if running.timer is not None:
            running.timer.cancel()
        if running.span is not None:
            self._end_span(running)
            with self._lock:
                self._spans_open -= 1
        if owed:
            self._send(CancelAck(call_id))
        if idle and (self._shutdown_requested or self._stopping):
            self._idle.set()
            self._wake()

    def _stop_call(self, running: _Running, reason: str) -> None:
        """Stop a call, from any thread: async work is cancelled on its loop; a
        sync handler is told through its context; a sync stream stops at its
        next step."""
        if running.on_loop:
            if self._async is not None:
                self._async.stop_call(running, reason)
            return
        if running.stop_reason is None:
            running.stop_reason = reason
        running.ctx._cancel()
        if running.gen is not None:
            if threading.get_ident() == self._main:
                if self._parked.pop(running.call.id, None) is not None:
                    self._pump(running)
            else:
                self._wake()  # a parked stream is stepped by the main thread

    def cancel_requested(self, call_id: int) -> None:
        """A Cancel arrived (on the control thread, or in-band on the main thread)."""
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
        else:
            self._stop_call(running, "cancel")

    def control_loop(self, fd: int, max_message_size: int) -> None:
        """Body of the control thread: Ping and Cancel, answered while a handler runs."""
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

    # --- sessions and hooks (main thread) -------------------------------------------

    def _end_session(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        if state is not None and self.app.session_end_hooks:
            try:
                self.run_hooks(self.app.session_end_hooks, session_id, state)
            except Exception:  # noqa: BLE001 - logged with its traceback; the worker goes on
                self._log.exception("worker.session_end_hook_failed", session=session_id)

    def run_hooks(self, hooks: list[Callable[..., Any]], *args: Any) -> None:
        """Run lifecycle hooks in order: sync ones here, on the thread of the sync
        handlers; async ones on the loop thread, waited for."""
        if not hooks:
            return
        import inspect  # only with hooks: an idle worker without them never loads it

        for hook in hooks:
            outcome = hook(*args)  # an async hook's coroutine, or whatever a sync one returns
            if inspect.isawaitable(outcome):
                self.ensure_loop().run(outcome)

    # --- lifecycle (main thread) --------------------------------------------------

    def stop(self, *, graceful: bool) -> None:
        """End every call (waiting for the async ones if graceful)."""
        self._stopping = True
        # A stream parked for credit gets none once reading has stopped: stop it first.
        for running in list(self._parked.values()):
            running.stop_reason = running.stop_reason or "shutdown"
            self._parked.pop(running.call.id, None)
            self._pump(running)
        if graceful:
            with self._lock:
                busy = bool(self._running)
            if busy:
                self._idle.wait()
        with self._lock:
            left = list(self._running.values())
        for running in left:
            self._stop_call(running, "shutdown")
        if left:
            self._idle.wait(1.0)
        self.flush()

    def close(self) -> None:
        """Stop the loop thread (after the shutdown hooks) and release the wake pipe."""
        if self._async is not None:
            self._async.close()
        for end in self._wake_pair:
            end.close()


def serve(
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
    (``corral._streamed``), read straight into the values' memory.
    """
    os.set_blocking(read_fd, True)
    if stream is None:
        encoder = FrameEncoder(max_message_size, large_buffers)
        writer = BlockingFrameWriter(write_fd, encoder)
        decoder: FrameDecoder[Any] = FrameDecoder(WorkerBound, max_message_size, large_buffers)  # type: ignore[arg-type]
    else:
        from .._streamed import StreamFrameDecoder, StreamFrameEncoder, StreamingBlockingWriter

        encoder = streaming = StreamFrameEncoder(max_message_size)
        streaming.enable(*stream)
        writer = StreamingBlockingWriter(write_fd, streaming)
        decoder = StreamFrameDecoder(WorkerBound, max_message_size, fd=read_fd)  # type: ignore[arg-type]
    runtime = MainThreadRuntime(app, worker_id, read_fd, writer, encoder, decoder)
    if control_fd is not None:
        threading.Thread(
            target=runtime.control_loop,
            args=(control_fd, max_message_size),
            name="corral-control",
            daemon=True,
        ).start()
    exit_code = 0
    try:
        if app.has_async_handlers:
            runtime.ensure_loop()  # the first async call pays no thread start
        try:
            runtime.run_hooks(app.startup_hooks)
        except Exception:  # noqa: BLE001 - logged with its traceback
            # reported on stderr; the pool turns it into WorkerStartError
            runtime._log.exception("worker.startup_failed")
            return 4
        runtime._send(Hello(PROTOCOL_VERSION, os.getpid(), worker_id, sorted(app.handlers)))
        runtime.flush()
        graceful = runtime.serve_forever()
        runtime.stop(graceful=graceful)
        try:
            runtime.run_hooks(app.shutdown_hooks)
        except Exception:  # noqa: BLE001 - logged with its traceback
            # reported on stderr; the worker still exits
            runtime._log.exception("worker.shutdown_hook_failed")
            exit_code = 5
    finally:
        runtime.close()
        with contextlib.suppress(OSError):
            os.close(read_fd)
        with contextlib.suppress(OSError):
            writer.close()
    return exit_code
