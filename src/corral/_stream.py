"""Streams: the items a generator handler yields, as an async iterator.

Owns: one stream's progress (``CallStream``: its worker, its pending call, the
credit given back as the consumer takes items, and its end, counted once).
Must not touch: placement (the dispatcher gives it a worker, or its checkout
does), or the wire (the call path starts it, the worker's handle carries it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ._calls import CallPath
from ._dispatch import Dispatcher
from ._handle import _END, PendingCall, WorkerHandle
from ._tracing import CallSpan

if TYPE_CHECKING:
    from ._lease import WorkerLease

__all__ = ["CallStream"]


class CallStream:
    """``async for item in pool.stream(...)``; ``aclose()`` (or break) stops it."""

    def __init__(
        self,
        calls: CallPath,
        dispatcher: Dispatcher,
        lease: WorkerLease | None,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        session: str | None,
        deadline: float | None,
    ) -> None:
        self._calls = calls
        self._dispatcher = dispatcher
        self._lease = lease
        self._method = method
        self._args = args
        self._kwargs = dict(kwargs)
        self._session = session
        self._deadline = deadline
        self._worker: WorkerHandle | None = None
        self._pending: PendingCall | None = None
        self._done = False
        self._span: CallSpan | None = None
        self._ended = False  # counted (and its span closed): once

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        pending = self._pending
        if pending is None:
            try:
                pending = await self._begin()
            except BaseException as exc:
                self._done = True
                self._end(exc)
                raise
        worker = self._worker
        assert worker is not None
        try:
            item = await pending.next_item()
        except asyncio.CancelledError:
            self._stop()
            raise
        except BaseException as exc:
            self._done = True
            self._end(exc)
            raise
        if item is _END:
            self._done = True
            self._end(None)
            raise StopAsyncIteration
        if pending.taken * 2 >= pending.stream_window:
            worker.grant_credit(pending)
        return item

    def _end(self, error: BaseException | None) -> None:
        """Count the stream's outcome and close its span, once."""
        if self._ended:
            return
        self._ended = True
        if error is None:
            self._calls.succeeded(None, self._span)
        else:
            self._calls.ended(error, self._method, self._session, None, self._span)

    async def _begin(self) -> PendingCall:
        calls = self._calls
        self._span = calls.span(self._method, self._session, True)
        lease = self._lease
        if lease is not None:
            lease._check(self._method)
            worker = lease._worker
            reserved = False
        else:
            worker = await self._dispatcher.acquire(
                self._session, False, self._deadline, self._method
            )
            reserved = True
        self._worker = worker
        self._pending = calls.start(
            worker,
            self._method,
            self._args,
            self._kwargs,
            self._session,
            self._deadline,
            self._span,
            reserved=reserved,
            stream_window=calls.stream_window,
        )
        if lease is not None:
            lease._pending.add(self._pending)
        return self._pending

    def _stop(self) -> None:
        self._done = True
        pending, worker = self._pending, self._worker
        if pending is not None and worker is not None:
            if not self._ended:
                self._end(asyncio.CancelledError())  # stopped by its consumer
            worker.cancel(pending)
            if self._lease is not None:
                self._lease._pending.discard(pending)

    async def aclose(self) -> None:
        """Stop the stream; the handler is cancelled in the worker if still running."""
        self._stop()

    async def __aenter__(self) -> CallStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop()

    def __del__(self) -> None:
        if not self._done and self._pending is not None and self._worker is not None:
            # RuntimeError: the loop is already closed: the worker is gone too.
            with contextlib.suppress(RuntimeError):
                self._stop()
