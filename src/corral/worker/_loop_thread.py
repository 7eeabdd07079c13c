"""The event loop of a worker's async handlers, on a thread of its own.

Owns: the loop thread (``corral-async``), started only for an app with async
code; async handlers and async generators as tasks on it, their deadlines,
stream credit and cancellation. Must not touch: the main pipe (the main thread
reads it and hands calls over here) or sync handlers. Replies go through the
runtime's ``_send``, which writes them from this thread.

Imported only when an app has async code, so a sync-only worker never imports
asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
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
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()
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

    # --- from the main (or control) thread --------------------------------------

    def _hand_over(self, fn: Callable[..., None], *args: Any) -> None:
        if self._closed:
            return  # the loop is gone: nothing runs there any more
        self._inbox.append((fn, args))
        with contextlib.suppress(OSError):  # closed meanwhile
            os.write(self._wake_w, b"w")

    def start_call(self, running: _Running, handler: Handler) -> None:
        self._hand_over(self._launch, running, handler)

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
        loop = self.loop
        call = running.call
        if call.timeout is not None:
            running.timer = loop.call_later(call.timeout, self._deadline_passed, running)
        coro = self._run(running, handler)
        context = running.span_context
        if _EAGER_TASKS:
            running.task = asyncio.Task(coro, loop=loop, eager_start=True, context=context)  # type: ignore[call-arg]
            return
        if context is None:
            task = running.task = loop.create_task(coro)
        else:
            task = running.task = loop.create_task(coro, context=context)
        # Python 3.11 has no eager tasks: run the first step now, as 3.12 would,
        # rather than in the loop's next round (a handler that does not await
        # then ends here). The step is the handle the task just scheduled.
        ready = getattr(loop, "_ready", None)
        if ready and getattr(ready[-1]._callback, "__self__", None) is task:
            ready.pop()._run()

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
