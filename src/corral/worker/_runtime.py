"""The worker's event loop: read calls, run handlers, answer, keep sessions.

Owns: dispatch of every parent-bound frame inside one worker process, the sync
lane (one thread, so sync handlers run one at a time while the loop stays free
to answer pings and cancels), async handler tasks, stream credit, deadlines,
cancellation and per-session state. Must not touch: how the process was started
or its descriptors (``__main__`` does that), or anything of the parent's.

Rules it keeps (docs/protocol.md): every Call ends with exactly one of Result,
Error, End or CancelAck; every Cancel gets exactly one CancelAck, sent after the
call has really stopped, and it is the last frame of that call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import structlog

from .._errors import EncodeError, PayloadTooLarge, ProtocolError
from .._framing import FrameDecoder, FrameEncoder
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
from .._transport import PipeConnection, open_pipe_connection
from ._app import App, Context, Handler, HandlerKind

__all__ = ["WorkerRuntime", "run_hooks", "serve"]

_NOT_FOUND_LISTED = 8
_DONE = object()


class _Running:
    __slots__ = (
        "call",
        "cancel_requested",
        "credit",
        "credit_event",
        "ctx",
        "job",
        "stop_reason",
        "task",
        "timer",
    )

    def __init__(self, call: Call, ctx: Context) -> None:
        self.call = call
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        self.job: concurrent.futures.Future[Any] | None = None  # sync work on the lane
        self.cancel_requested = False
        self.stop_reason: str | None = None  # "cancel", "deadline" or "shutdown"
        self.timer: asyncio.TimerHandle | None = None
        self.credit = call.window
        self.credit_event: asyncio.Event | None = None


def _describe(exc: BaseException) -> tuple[str, str, str]:
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    try:
        message = str(exc)
    except Exception as str_failure:  # noqa: BLE001 - a broken __str__ must not kill the worker
        message = f"<unprintable {kind.__name__}: {str_failure!r}>"
    return name, message, "".join(traceback.format_exception(exc))


async def run_hooks(hooks: list[Callable[..., Any]], *args: Any) -> None:
    """Run lifecycle hooks in order; async ones are awaited."""
    for hook in hooks:
        outcome = hook(*args)
        if inspect.isawaitable(outcome):
            await outcome


class WorkerRuntime:
    """Serves one App over one connection until Shutdown or the parent goes away."""

    def __init__(self, app: App, worker_id: str) -> None:
        self.app = app
        self.worker_id = worker_id
        self.connection: PipeConnection | None = None
        self.sessions: dict[str, dict[str, Any]] = {}
        self._running: dict[int, _Running] = {}
        self._lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="corral-sync")
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._shutdown_requested = False
        self._log = structlog.get_logger("corral.worker").bind(worker_id=worker_id, pid=os.getpid())

    # --- FrameListener ------------------------------------------------------

    def frame_received(self, message: WorkerBound) -> None:
        if isinstance(message, Call):
            self._start(message)
        elif isinstance(message, Ping):
            self._send(Pong(message.seq))
        elif isinstance(message, Cancel):
            self._cancel(message.id)
        elif isinstance(message, Credit):
            self._add_credit(message.id, message.n)
        elif isinstance(message, EndSession):
            self._end_session(message.session)
        elif isinstance(message, Shutdown):
            self._shutdown_requested = True
            self._stopped.set()

    def connection_broken(self, error: ProtocolError | None) -> None:
        if error is not None:
            self._log.error("worker.protocol_error", error=str(error))
        self._stopped.set()

    # --- sending --------------------------------------------------------------

    def _send(self, message: Any) -> None:
        if self.connection is not None:
            self.connection.send(message)

    def _send_error(self, call_id: int, kind: str, exc: BaseException) -> None:
        name, message, tb = _describe(exc)
        self._send(Error(call_id, kind, name, message, tb))

    def _send_value(self, call_id: int, value: Any, method: str, chunk: bool = False) -> bool:
        """Send a Result (or Chunk); if it cannot be sent, an Error instead. True if sent."""
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
            return False
        except PayloadTooLarge as exc:
            self._send(Error(call_id, ErrorKind.TOO_LARGE, "PayloadTooLarge", str(exc)))
            return False
        return True

    # --- calls ----------------------------------------------------------------

    def _start(self, call: Call) -> None:
        handler = self.app.handlers.get(call.method)
        if handler is None:
            known = sorted(self.app.handlers)
            listed = ", ".join(repr(n) for n in known[:_NOT_FOUND_LISTED])
            more = (
                f" and {len(known) - _NOT_FOUND_LISTED} more"
                if len(known) > _NOT_FOUND_LISTED
                else ""
            )
            self._send(
                Error(
                    call.id,
                    ErrorKind.METHOD_NOT_FOUND,
                    "MethodNotFound",
                    f"no handler named {call.method!r}; this worker has {listed or 'none'}{more}",
                )
            )
            return
        if handler.kind.streams and not call.stream:
            self._send(
                Error(
                    call.id,
                    ErrorKind.USAGE,
                    "TypeError",
                    f"handler {call.method!r} is a {handler.kind.value}: use pool.stream(), "
                    "not pool.call()",
                )
            )
            return
        deadline = None
        if call.timeout is not None:
            if call.timeout <= 0:
                self._send(
                    Error(
                        call.id,
                        ErrorKind.TIMEOUT,
                        "TimeoutError",
                        "deadline passed before the call started",
                    )
                )
                return
            deadline = time.monotonic() + call.timeout
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
            deadline=deadline,
        )
        running = _Running(call, ctx)
        self._running[call.id] = running
        if call.timeout is not None:
            running.timer = self._loop.call_later(call.timeout, self._deadline_passed, running)
        running.task = self._loop.create_task(self._run(running, handler))

    async def _run(self, running: _Running, handler: Handler) -> None:
        call = running.call
        kwargs = call.kwargs
        if handler.wants_context:
            kwargs = {**kwargs, "ctx": running.ctx}
        try:
            kind = handler.kind
            if kind is HandlerKind.ASYNC:
                value = await handler.fn(*call.args, **kwargs)
                self._send_value(call.id, value, call.method)
            elif kind is HandlerKind.SYNC:
                value = await self._on_lane(running, handler.fn, *call.args, **kwargs)
                self._send_value(call.id, value, call.method)
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
                gen = await self._on_lane(running, handler.fn, *call.args, **kwargs)
                try:
                    while (item := await self._on_lane(running, next, gen, _DONE)) is not _DONE:
                        if not await self._emit(running, item):
                            break
                    else:
                        self._send(End(call.id))
                finally:
                    await asyncio.wrap_future(self._lane.submit(gen.close))
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
            if not running.cancel_requested:
                self._send_error(call.id, ErrorKind.REMOTE, exc)
        finally:
            self._finish(running)

    async def _on_lane(
        self, running: _Running, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Run ``fn`` on the sync lane; a cancel before it starts means it never runs."""
        if running.stop_reason is not None:
            raise asyncio.CancelledError
        job = self._lane.submit(fn, *args, **kwargs)
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
        return self._send_value(running.call.id, item, running.call.method, chunk=True)

    def _add_credit(self, call_id: int, n: int) -> None:
        running = self._running.get(call_id)
        if running is not None:
            running.credit += n
            if running.credit_event is not None:
                running.credit_event.set()

    def _finish(self, running: _Running) -> None:
        """The call is over: say so once (CancelAck if it was cancelled)."""
        call_id = running.call.id
        if self._running.pop(call_id, None) is None:
            return
        if running.timer is not None:
            running.timer.cancel()
        if running.cancel_requested:
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
        if task is not None:
            task.cancel()
            # A task cancelled before its first step never runs its body (nor its
            # finally): finish it from here in that case.
            task.add_done_callback(lambda _: self._finish(running))

    def _cancel(self, call_id: int) -> None:
        running = self._running.get(call_id)
        if running is None:
            # Already finished: its last frame is on its way; acknowledge anyway.
            self._send(CancelAck(call_id))
            return
        if running.cancel_requested:
            return
        running.cancel_requested = True
        self._stop_call(running, "cancel")

    def _deadline_passed(self, running: _Running) -> None:
        running.timer = None
        if running.call.id in self._running:
            self._stop_call(running, "deadline")

    def _end_session(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        if state is not None and self.app.session_end_hooks:
            self._loop.create_task(self._session_ended(session_id, state))

    async def _session_ended(self, session_id: str, state: dict[str, Any]) -> None:
        try:
            await run_hooks(self.app.session_end_hooks, session_id, state)
        except Exception:  # noqa: BLE001 - logged with its traceback; the worker goes on
            self._log.exception("worker.session_end_hook_failed", session=session_id)

    # --- lifecycle --------------------------------------------------------------

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, *, graceful: bool) -> None:
        """End every call (waiting for them if graceful), then release the lane."""
        if graceful:
            while self._running:
                self._stopped.clear()
                await self._stopped.wait()
        for running in list(self._running.values()):
            self._stop_call(running, "shutdown")
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self._lane.shutdown(wait=False, cancel_futures=True)


async def serve(
    app: App, worker_id: str, read_fd: int, write_fd: int, max_message_size: int
) -> int:
    """Run the worker until told to stop; returns the process exit code."""
    log = structlog.get_logger("corral.worker").bind(worker_id=worker_id, pid=os.getpid())
    runtime = WorkerRuntime(app, worker_id)
    connection = await open_pipe_connection(
        read_fd,
        write_fd,
        runtime,
        FrameDecoder(WorkerBound, max_message_size),  # type: ignore[arg-type]
        FrameEncoder(max_message_size),
    )
    runtime.connection = connection
    exit_code = 0
    try:
        try:
            await run_hooks(app.startup_hooks)
        except Exception:  # reported on stderr; the pool turns it into WorkerStartError
            log.exception("worker.startup_failed")
            return 4
        connection.send(Hello(PROTOCOL_VERSION, os.getpid(), worker_id, sorted(app.handlers)))
        await runtime.wait_stopped()
        graceful = runtime._shutdown_requested
        await runtime.stop(graceful=graceful)
        try:
            await run_hooks(app.shutdown_hooks)
        except Exception:  # reported on stderr; the worker still exits
            log.exception("worker.shutdown_hook_failed")
            exit_code = 5
    finally:
        with contextlib.suppress(OSError):
            connection.close()
    return exit_code
