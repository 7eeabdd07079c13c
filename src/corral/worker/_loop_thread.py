"""The event loop of a worker's async handlers, on a thread of its own.

Owns: the loop thread (``corral-async``), started only for an app with async
code; async handlers and async generators as tasks on it, their deadlines,
stream credit and cancellation; the loop lock, which says who may touch the
loop's state. Must not touch: the main pipe (the main thread reads it and hands
calls over here) or sync handlers. Replies go through the runtime's ``_send``.

The first step of a call (decision 0028): when the loop is idle (its thread
waits in ``select`` and has released the loop lock, and nothing handed over is
waiting), the main thread takes the lock and runs the task's first step itself,
with the loop set as its running loop; a handler that does not suspend ends
there, with no hand-over. One that suspends stays a task of this loop: the main
thread wakes the loop thread, which runs the rest. Otherwise the call is handed
over as before.

Imported only when an app has async code, so a sync-only worker never imports
asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import os
import selectors
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .._messages import End, ErrorKind
from ._app import Handler, HandlerKind

if TYPE_CHECKING:
    from ._main_thread import MainThreadRuntime, _Running

__all__ = ["LoopThread"]

_EAGER_TASKS = sys.version_info >= (3, 12)
# Where the first step may run on the main thread: the versions whose tasks keep
# the current task per loop (3.14 keeps it per thread) and that are tested here.
_FIRST_STEP_HERE = sys.version_info < (3, 14)
_set_running_loop = asyncio.events._set_running_loop
_DEFAULT_POLICY = asyncio.DefaultEventLoopPolicy


class _LockReleasingSelector(selectors.DefaultSelector):
    """The loop's selector: the loop thread holds the loop lock except while it
    waits in ``select``, so another thread that takes the lock knows the loop is
    idle and may touch its state."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self._loop_lock = lock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._loop_lock.release()
        try:
            return super().select(timeout)
        finally:
            self._loop_lock.acquire()


class LoopThread:
    """An event loop running on a thread of its own, serving one runtime's async calls."""

    def __init__(self, runtime: MainThreadRuntime) -> None:
        self._runtime = runtime
        self._flush_scheduled = False  # loop thread only
        # Work handed over by other threads, in order, and what wakes the loop
        # for it: one write and one read per wake-up, where the loop's own
        # call_soon_threadsafe costs a send and two recvs.
        self._inbox: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        # A socket pair, as asyncio's own self-pipe: the worker's pipes are its
        # protocol's alone (tests/test_hygiene.py).
        self._wake_pair = socket.socketpair()
        self._wake_r, self._wake_w = (end.fileno() for end in self._wake_pair)
        os.set_blocking(self._wake_r, False)
        self._closed = False
        # Held by the loop thread except while it waits in select (see
        # _LockReleasingSelector); the main thread takes it to run a first step.
        self._lock = threading.Lock()
        ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop
        if _FIRST_STEP_HERE and type(asyncio.get_event_loop_policy()) is _DEFAULT_POLICY:
            self.loop = asyncio.SelectorEventLoop(_LockReleasingSelector(self._lock))
            self._first_step_here = True
        else:  # an event loop policy of the app's own (uvloop): every call is handed over
            self.loop = asyncio.new_event_loop()
            self._first_step_here = False
        self.thread = threading.Thread(
            target=self._main, args=(ready,), name="corral-async", daemon=True
        )
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.add_reader(self._wake_r, self._drain)
        loop.call_soon(ready.set)
        if self._first_step_here:
            self._lock.acquire()  # released only while the loop waits in select
        try:
            loop.run_forever()
        finally:
            try:
                loop.remove_reader(self._wake_r)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                for end in self._wake_pair:
                    end.close()
                if self._first_step_here:
                    self._lock.release()

    # --- from the main (or control) thread --------------------------------------

    def _hand_over(self, fn: Callable[..., None], *args: Any) -> None:
        if self._closed:
            return  # the loop is gone: nothing runs there any more
        self._inbox.append((fn, args))
        self._wake_loop()

    def _wake_loop(self) -> None:
        with contextlib.suppress(OSError):  # closed meanwhile
            os.write(self._wake_w, b"w")

    def start_call(self, running: _Running, handler: Handler) -> None:
        """Start an async call (main thread): its first step here if the loop is
        idle and nothing handed over waits before it, else on the loop thread."""
        if self._first_step_here and not self._inbox and self._lock.acquire(blocking=False):
            try:
                # Under the lock, an empty inbox means every call handed over
                # before this one has started: calls start in the order they came.
                if not self._inbox and not self._closed and not self.loop.get_debug():
                    self._first_step(running, handler)
                    return
            finally:
                self._lock.release()
        self._hand_over(self._launch, running, handler)

    def _first_step(self, running: _Running, handler: Handler) -> None:
        """Run the call's first step on this (the main) thread, the loop lock held.

        The loop is its running loop meanwhile, so the handler sees the loop it
        would see on the loop thread, and its task is a task of that loop. If
        the task suspended, or scheduled anything on the loop, the loop thread
        is woken: it waits in select with a timeout computed before.
        """
        loop: Any = self.loop
        ready, scheduled = loop._ready, loop._scheduled
        timers = len(scheduled)
        runtime = self._runtime
        if runtime._out:
            runtime.flush()  # earlier replies must not wait for this step
        runtime._stepping = True
        _set_running_loop(loop)
        try:
            task = self._start_task(running, handler)
        finally:
            _set_running_loop(None)
            runtime._stepping = False
        if not task.done():
            self._arm_deadline(running)
            self._wake_loop()
        elif ready or len(scheduled) != timers:
            self._wake_loop()

    def add_credit(self, running: _Running, n: int) -> None:
        self._hand_over(self._credit, running, n)

    def stop_call(self, running: _Running, reason: str) -> None:
        self._hand_over(self._stop, running, reason)

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run ``awaitable`` on the loop and wait for its outcome (a hook)."""
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
            _awaited(awaitable), self.loop
        )
        return future.result()

    def close(self) -> None:
        self._hand_over(self.loop.stop)
        self._closed = True
        self.thread.join(5.0)

    # --- on the loop thread ----------------------------------------------------------

    def _drain(self) -> None:
        """Run what other threads handed over, in the order they did."""
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            fn(*args)

    def flush_soon(self) -> None:
        """Write queued frames at the end of this tick (frames of calls that end
        in one tick go out in one write)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._runtime.flush()

    def _launch(self, running: _Running, handler: Handler) -> None:
        """Start a call handed over to the loop thread (its first step runs now)."""
        if not self._start_task(running, handler).done():
            self._arm_deadline(running)

    def _arm_deadline(self, running: _Running) -> None:
        """A suspended call with a deadline is stopped by a timer when it passes.

        Armed after the first step: a call that ends in it leaves no timer (its
        late result is a timeout anyway, see ``_send_return``).
        """
        deadline = running.ctx.deadline
        if deadline is not None and running.call.id in self._runtime._running:
            running.timer = self.loop.call_at(deadline, self._deadline_passed, running)

    def _start_task(self, running: _Running, handler: Handler) -> asyncio.Task[None]:
        """The call's task, with its first step run now, on this thread.

        Each call runs in a context of its own (its span's, if traced), never in
        the context of the thread that starts it.
        """
        loop = self.loop
        coro = self._run(running, handler)
        context = running.span_context or contextvars.Context()
        if _EAGER_TASKS:
            task: asyncio.Task[None] = asyncio.Task(
                coro,
                loop=loop,
                eager_start=True,  # type: ignore[call-arg]
                context=context,
            )
            running.task = task
            return task
        # Python 3.11 has no eager tasks: run the first step now, as 3.12 would,
        # rather than in the loop's next round (a handler that does not await
        # then ends here). The step is the handle the task just scheduled.
        task = running.task = asyncio.Task(coro, loop=loop, context=context)
        ready = getattr(loop, "_ready", None)
        if ready and getattr(ready[-1]._callback, "__self__", None) is task:
            ready.pop()._run()
        return task

    async def _run(self, running: _Running, handler: Handler) -> None:
        runtime = self._runtime
        call = running.call
        kwargs = {**call.kwargs, "ctx": running.ctx} if handler.wants_context else call.kwargs
        try:
            if handler.kind is HandlerKind.ASYNC:
                value = await handler.fn(*call.args, **kwargs)
                runtime._send_return(running, value)
            else:
                agen = handler.fn(*call.args, **kwargs)
                try:
                    async for item in agen:
                        if not await self._emit(running, item):
                            break
                    else:
                        runtime._send(End(call.id))
                finally:
                    await agen.aclose()
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise  # not ours: the worker's loop is going away
            if running.stop_reason == "deadline" and not running.cancel_requested:
                runtime._send_late(call.id)
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's RemoteError
            running.outcome = "error"
            if not running.cancel_requested:
                running.error_type = runtime._send_error(call.id, ErrorKind.REMOTE, exc)
        finally:
            runtime._finish(running)

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
        call = running.call
        failure = self._runtime._send_value(call.id, item, call.method, chunk=True)
        if failure is None:
            return True
        running.outcome, running.error_type = "error", failure
        return False

    def _credit(self, running: _Running, n: int) -> None:
        running.credit += n
        if running.credit_event is not None:
            running.credit_event.set()

    def _deadline_passed(self, running: _Running) -> None:
        running.timer = None
        if running.call.id in self._runtime._running:
            self._stop(running, "deadline")

    def _stop(self, running: _Running, reason: str) -> None:
        """Stop async work: its task is cancelled now."""
        if running.stop_reason is None:
            running.stop_reason = reason
        running.ctx._cancel()
        if running.credit_event is not None:
            running.credit_event.set()  # a stream waiting for credit sees the stop
        task = running.task
        if task is not None and not task.done():
            task.cancel()
            # A task cancelled before its first step never runs its body (nor its
            # finally): finish it from here in that case.
            task.add_done_callback(lambda _: self._runtime._finish(running))


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
