"""Checkout: one worker held by one caller for the length of an ``async with`` block.

Owns: the lease (``WorkerLease``: the leased worker, the calls in flight on it,
whether the block has ended) and its context manager (``Checkout``), which
takes the whole worker from the dispatcher and gives it back on every exit
path, synchronously. Must not touch: placement or the wait queues (the
dispatcher), or the wire (the call path starts the lease's calls).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._calls import CallPath, clock
from ._dispatch import Dispatcher
from ._door import check_method
from ._errors import PoolClosed
from ._handle import PendingCall, WorkerHandle
from ._pool_state import PoolLifecycle

if TYPE_CHECKING:
    from ._stream import CallStream

__all__ = ["Checkout", "WorkerLease"]


class WorkerLease:
    """One worker held exclusively inside ``async with pool.checkout()``."""

    def __init__(
        self,
        lifecycle: PoolLifecycle,
        calls: CallPath,
        dispatcher: Dispatcher,
        worker: WorkerHandle,
        session: str | None,
    ) -> None:
        self._lifecycle = lifecycle
        self._calls = calls
        self._dispatcher = dispatcher
        self._worker = worker
        self.session = session
        self._pending: set[PendingCall] = set()
        self._active = True

    @property
    def id(self) -> str:
        """The leased worker's id (``"pool1-3"``), as in errors and logs."""
        return self._worker.id

    @property
    def pid(self) -> int | None:
        """The leased worker's process id, or None if it never said ``Hello``."""
        return self._worker.pid

    @property
    def failed(self) -> bool:
        """True once the worker died, broke the protocol or is being evicted."""
        return not self._worker.state.accepting or self._worker.kill_reason is not None

    def _check(self, method: str) -> None:
        if not self._active:
            raise PoolClosed(f"the checkout of worker {self.id} has ended", method=method)
        self._lifecycle.check_open()

    async def call(
        self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Run a call on this worker (in the checkout's session, if it has one)."""
        method = check_method(method)
        self._check(method)
        calls = self._calls
        session = self.session
        deadline = calls.deadline(timeout)
        worker = self._worker
        started = clock()
        span = calls.span(method, session, False)
        pending = None
        try:
            pending = calls.start(
                worker, method, args, kwargs, session, deadline, span, reserved=False
            )
            self._pending.add(pending)
            try:
                result = await pending.future
            except asyncio.CancelledError:
                worker.cancel(pending)
                raise
        except BaseException as exc:
            calls.ended(exc, method, session, started, span)
            raise
        finally:
            if pending is not None:
                self._pending.discard(pending)
        calls.succeeded(started, span)
        return result

    def stream(
        self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> CallStream:
        """Stream the items of a handler run on this worker (in the checkout's session).

        The same as ``Pool.stream()``, on the leased worker: iterate the result
        with ``async for``.
        """
        from ._stream import CallStream

        method = check_method(method)
        self._check(method)
        return CallStream(
            self._calls,
            self._dispatcher,
            self,
            method,
            args,
            kwargs,
            self.session,
            self._calls.deadline(timeout),
        )

    def _release(self) -> None:
        if not self._active:
            return
        self._active = False
        worker = self._worker
        for pending in list(self._pending):
            worker.cancel(
                pending,
                PoolClosed(
                    f"the checkout of worker {self.id} ended while {pending.method!r} "
                    "was in flight",
                    worker_id=self.id,
                    pid=self.pid,
                    method=pending.method,
                    call_id=pending.id,
                ),
            )
        self._pending.clear()
        worker.release_lease()

    def __repr__(self) -> str:
        released = " released" if not self._active else ""
        return f"<corral.WorkerLease {self.id} pid={self.pid}{released}>"


class Checkout:
    """The async context manager returned by ``Pool.checkout()``."""

    def __init__(
        self,
        lifecycle: PoolLifecycle,
        calls: CallPath,
        dispatcher: Dispatcher,
        session: str | None,
        timeout: float | None,
    ) -> None:
        self._lifecycle = lifecycle
        self._calls = calls
        self._dispatcher = dispatcher
        self._session = session
        self._timeout = timeout
        self._lease: WorkerLease | None = None

    async def __aenter__(self) -> WorkerLease:
        deadline = None
        if self._timeout is not None:  # checked by Pool.checkout()
            deadline = asyncio.get_running_loop().time() + self._timeout
        worker = await self._dispatcher.acquire(self._session, True, deadline, None)
        self._calls.sessions.touch(self._session)
        self._lease = WorkerLease(
            self._lifecycle, self._calls, self._dispatcher, worker, self._session
        )
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Synchronous on purpose: nothing here awaits, so cancellation cannot
        # interrupt it and no exit path leaks the worker.
        lease, self._lease = self._lease, None
        if lease is not None:
            lease._release()
            self._calls.sessions.touch(self._session)
