"""The dispatcher: which caller gets which worker, and when.

Owns: the wait queues (``WaitQueues``: plain calls, checkouts, and session
callers queued by their home worker), the claim (one worker drained for a
waiting checkout), the one pair that hands out slots (``try_acquire``, the fast
path with nothing to wait for, and ``acquire``, which waits), calls that wait
in the queue as calls (``call_when_free``: sent by ``serve`` through the send
function the call path gave them, decision 0027), handing freed capacity to
waiters (``serve``, which returns how many it granted), and the watchers woken
on every change (``wait_until``). Decisions come from ``_router`` (pure) and
``Sessions`` (a session's home). Must not touch: worker processes, the restart
budget or recycling (the supervisor), or what a call sends (the call path).

Accounting rule: a slot is reserved on the worker synchronously when granted,
and given back synchronously by whoever took it, on every path.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from . import _router
from ._errors import (
    CallTimeout,
    CorralError,
    PoolFailed,
    PoolOverloaded,
    PoolTimeout,
    SessionLost,
)
from ._handle import PendingCall, WorkerHandle
from ._pool_state import PoolLifecycle, PoolState
from ._sessions import Sessions

__all__ = ["Dispatcher", "SendQueued", "WaitQueues"]

# Sends a queued call on the worker granted to it, settling the future it is given
# with the call's outcome; raises with nothing sent (the call path's ``start``).
SendQueued = Callable[[WorkerHandle, "asyncio.Future[Any]"], PendingCall]


class _Waiter:
    """A caller waiting for a slot; or, for a plain call (``send`` set), the call
    itself, which ``serve`` sends on the worker it grants."""

    __slots__ = (
        "exclusive",
        "future",
        "home",
        "method",
        "pending",
        "queued",
        "send",
        "session",
        "timer",
        "worker",
    )

    def __init__(
        self,
        future: asyncio.Future[Any],
        session: str | None,
        exclusive: bool,
        method: str | None,
        send: SendQueued | None = None,
    ) -> None:
        self.future = future  # the worker granted; for a queued call, its outcome
        self.session = session
        self.exclusive = exclusive
        self.method = method
        self.queued = False
        self.home: WorkerHandle | None = None  # a session waiter's worker when queued
        self.timer: asyncio.TimerHandle | None = None  # its deadline or queue_timeout
        self.send = send
        self.worker: WorkerHandle | None = None  # a queued call: where it was sent
        self.pending: PendingCall | None = None  # a queued call, once sent


class WaitQueues:
    """Callers waiting for a worker, by what they wait for; each queue is FIFO.

    Session callers queue by the worker that holds their session (their home),
    so a slot freed on one worker is offered to that worker's queue alone.
    """

    __slots__ = ("_session_counts", "exclusive", "plain", "sessions")

    def __init__(self) -> None:
        self.plain: collections.deque[_Waiter] = collections.deque()
        self.exclusive: collections.deque[_Waiter] = collections.deque()
        self.sessions: dict[WorkerHandle | None, collections.deque[_Waiter]] = {}
        # A plain dict, not a Counter: its missing keys and deletions cost Python calls.
        self._session_counts: dict[str, int] = {}

    def _queue_of(self, waiter: _Waiter) -> collections.deque[_Waiter]:
        if waiter.session is not None:
            return self.sessions[waiter.home]
        return self.exclusive if waiter.exclusive else self.plain

    def has_waiters_like(self, session: str | None, exclusive: bool) -> bool:
        """Whether a new request of this kind must queue behind earlier ones."""
        if session is not None:
            return session in self._session_counts
        return bool(self.exclusive) if exclusive else bool(self.plain or self.exclusive)

    def add(self, waiter: _Waiter, home: WorkerHandle | None = None) -> None:
        waiter.queued = True
        if waiter.session is not None:
            waiter.home = home
            counts = self._session_counts
            counts[waiter.session] = counts.get(waiter.session, 0) + 1
            self.sessions.setdefault(home, collections.deque()).append(waiter)
        else:
            self._queue_of(waiter).append(waiter)

    def discard(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        queue = self._queue_of(waiter)
        if queue and queue[0] is waiter:
            queue.popleft()
        else:
            queue.remove(waiter)
        if waiter.session is not None:
            self._forget_session_waiter(waiter, queue)

    def _forget_session_waiter(self, waiter: _Waiter, queue: collections.deque[_Waiter]) -> None:
        assert waiter.session is not None
        counts = self._session_counts
        left = counts[waiter.session] - 1
        if left:
            counts[waiter.session] = left
        else:
            del counts[waiter.session]
        if not queue:
            del self.sessions[waiter.home]

    def fail_all(self, error: CorralError) -> None:
        queues = [self.exclusive, self.plain, *self.sessions.values()]
        for queue in queues:
            for waiter in queue:
                waiter.queued = False
                if not waiter.future.done():
                    waiter.future.set_exception(error)
            queue.clear()
        self.sessions.clear()
        self._session_counts.clear()

    def __len__(self) -> int:
        return len(self.plain) + len(self.exclusive) + sum(self._session_counts.values())


class Dispatcher:
    """Hands workers' slots to callers: at once when free, else in order as they free up."""

    def __init__(
        self,
        lifecycle: PoolLifecycle,
        workers: list[WorkerHandle],
        sessions: Sessions,
        *,
        max_waiting: int | None,
        queue_timeout: float | None = None,
        failure: Callable[[], PoolFailed | None],
        callers_waiting: Callable[[], None],
    ) -> None:
        self._lifecycle = lifecycle
        self._workers = workers  # the supervisor's list: read here, never changed
        self._sessions = sessions
        self._max_waiting = max_waiting
        self._queue_timeout = queue_timeout  # a plain call's longest wait: PoolTimeout
        self._failure = failure  # the pool's PoolFailed while it is failed, else None
        self._callers_waiting = callers_waiting  # the supervisor may grow the pool
        self.queues = WaitQueues()
        self.claimed: WorkerHandle | None = None  # drained for a waiting checkout
        self._watchers: list[asyncio.Future[None]] = []  # woken on any change
        self.drained: asyncio.Event | None = None  # set once nothing is in flight, closing

    # --- taking a slot -----------------------------------------------------------

    def _place(self, session: str | None, exclusive: bool) -> WorkerHandle | None:
        """Which worker takes this request now, or None to wait (router rules 1-4)."""
        if session is None:
            return _router.pick_for_call(self._workers, exclusive)
        home = self._sessions.place(session, self._workers)  # may raise SessionLost, once
        if home is None:
            return None
        return home if _router.can_take(home, exclusive) else None

    def try_acquire(self, session: str | None) -> WorkerHandle | None:
        """A slot for a call, free now with nobody queued before it; None: ``acquire``."""
        if not self._lifecycle.open:
            return None  # acquire() raises the right error
        if session is None:  # ``has_waiters_like`` and ``_place`` for a plain call, inlined
            queues = self.queues
            if queues.plain or queues.exclusive:
                return None
            worker = _router.pick_for_call(self._workers)
        else:
            if self.queues.has_waiters_like(session, False):
                return None
            worker = self._place(session, False)
        if worker is not None:
            worker.reserve(False)
        return worker

    async def acquire(
        self, session: str | None, exclusive: bool, deadline: float | None, method: str | None
    ) -> WorkerHandle:
        """Wait for a worker and claim a slot on it (the whole worker if exclusive)."""
        self._lifecycle.check_open()
        queues = self.queues
        if not queues.has_waiters_like(session, exclusive):
            worker = self._place(session, exclusive)
            if worker is not None:
                worker.reserve(exclusive)
                return worker
        waiter = self._queue(session, exclusive, deadline, method, None)
        try:
            return await waiter.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().give_back(exclusive)  # granted, but the caller is gone
            raise
        finally:
            self._leave(waiter)

    async def call_when_free(
        self, session: str | None, deadline: float | None, method: str, send: SendQueued
    ) -> Any:
        """A call that found no free slot: it waits in the queue as a call.

        When a slot frees up, ``serve`` sends it on that worker at once, in the
        step that freed the slot, so its caller wakes once, for the outcome.
        Returns the call's result; raises its error (PoolClosed, PoolOverloaded,
        CallTimeout or PoolTimeout while it waits; whatever ``send`` raises).
        """
        if not self._lifecycle.open:
            self._lifecycle.check_open()
        waiter = self._queue(session, False, deadline, method, send)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.pending is not None and waiter.worker is not None:
                waiter.worker.cancel(waiter.pending)  # sent: stop it in the worker
            raise
        finally:
            self._leave(waiter)

    def _queue(
        self,
        session: str | None,
        exclusive: bool,
        deadline: float | None,
        method: str | None,
        send: SendQueued | None,
    ) -> _Waiter:
        """Queue a waiter (raising if the pool cannot take one), and serve at once if it can."""
        queues = self.queues
        failed = self._failure()
        if failed is not None:
            raise failed
        if self._max_waiting is not None and len(queues) >= self._max_waiting:
            raise PoolOverloaded(
                f"pool {self._lifecycle.name} has {len(queues)} callers waiting "
                f"(max_waiting={self._max_waiting})",
                method=method,
                session=session,
            )
        loop = self._lifecycle.loop
        assert loop is not None  # set when the pool started; check_open() passed
        waiter = _Waiter(loop.create_future(), session, exclusive, method, send)
        if session is None and not exclusive:
            waiter.queued = True
            queues.plain.append(waiter)
        else:
            queues.add(waiter, self._sessions.get(session) if session is not None else None)
        self._callers_waiting()
        if session is not None:
            # A new session pins now (every queue is looked at); a known one
            # joined its home's queue, the only one that changed.
            self.serve(waiter.home)
        elif exclusive or (
            (queues.exclusive or queues.plain[0].future.done()) and self._workers_free()
        ):
            # A checkout may claim a worker, and a plain caller queued behind
            # callers that are leaving (done, still at the head) may be served
            # at once; otherwise no worker can take it: the callers ahead of it
            # are waiting for the same thing.
            self.serve()
        elif self._watchers:
            self.wake_watchers()  # a new waiter is a change too
        if not waiter.future.done() and waiter.pending is None:
            queue_timeout = self._queue_timeout if method is not None else None
            if queue_timeout is not None and (
                deadline is None or loop.time() + queue_timeout < deadline
            ):
                # Refused before its deadline, with nothing run: the caller may go elsewhere.
                waiter.timer = loop.call_later(queue_timeout, self._queue_expired, waiter)
            elif deadline is not None:
                waiter.timer = loop.call_at(deadline, self._waiter_expired, waiter)
        return waiter

    def _workers_free(self) -> bool:
        return _router.pick_for_call(self._workers) is not None

    def _leave(self, waiter: _Waiter) -> None:
        """The waiter's caller is done waiting, however it ended."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        if not waiter.future.done():
            waiter.future.cancel()
        if waiter.queued:
            self.queues.discard(waiter)
        if waiter.exclusive and not self.queues.exclusive:
            self.serve()  # a claim held for this caller may be released

    def _waiter_expired(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        if waiter.method is None:
            error: CorralError = PoolTimeout(
                "no worker became free within the checkout timeout", session=waiter.session
            )
        else:
            error = CallTimeout(
                f"call {waiter.method!r} ran past its deadline while waiting for a worker",
                method=waiter.method,
                session=waiter.session,
            )
        waiter.future.set_exception(error)

    def _queue_expired(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        waiter.future.set_exception(
            PoolTimeout(
                f"no worker became free for {waiter.method!r} within queue_timeout="
                f"{self._queue_timeout}s; the call did not run",
                method=waiter.method,
                session=waiter.session,
            )
        )

    def fail_waiters(self, error: CorralError) -> None:
        self.queues.fail_all(error)

    # --- handing out freed capacity ------------------------------------------------

    def serve(self, freed: WorkerHandle | None = None) -> int:
        """Hand free capacity to waiters; returns the grants made. Synchronous.

        Called on every capacity change (``freed``: the worker whose capacity
        changed, if one did). Session waiters first (each can only use its own
        worker), then checkouts (which need an idle worker: if none is, one
        worker is claimed and takes no new calls until it drains, so checkouts
        cannot starve), then plain calls, oldest first.
        """
        queues = self.queues
        if not (
            queues.plain
            or queues.exclusive
            or queues.sessions
            or self.claimed is not None
            or self._watchers
            or self.drained is not None
        ):
            return 0  # the common case, on every call's reply: nobody to tell
        grants = 0
        workers = self._workers
        if queues.sessions:
            if freed is not None and freed.state.accepting:
                grants += self._serve_session_waiters(freed)
            else:
                for home in list(queues.sessions):
                    grants += self._serve_session_waiters(home)
        exclusive = queues.exclusive
        while exclusive:
            waiter = exclusive[0]
            if not waiter.future.done():
                worker = _router.pick_for_call(workers, exclusive=True)
                if worker is None:
                    break
                self._set_claim(None)
                self._grant(waiter, worker)
                grants += 1
            exclusive.popleft().queued = False
        if not exclusive:
            if self.claimed is not None:
                self._set_claim(None)
        elif self.claimed is None or not _router.can_claim(self.claimed):
            self._set_claim(_router.pick_claim(workers))
        plain = queues.plain
        while plain:
            waiter = plain[0]
            if not waiter.future.done():
                worker = _router.pick_for_call(workers)
                if worker is None:
                    break
                plain.popleft().queued = False  # first: sending may serve again
                self._hand_over(waiter, worker)
                grants += 1
                continue
            plain.popleft().queued = False
        drained = self.drained
        if (
            drained is not None
            and self._lifecycle.state is PoolState.CLOSING
            and not any(w.inflight for w in workers)
        ):
            drained.set()  # aclose() drains until this
        if self._watchers:
            self.wake_watchers()
        return grants

    def _serve_session_waiters(self, home: WorkerHandle | None) -> int:
        """Offer ``home``'s capacity to the callers whose session lives there, in order."""
        queues = self.queues
        queue = queues.sessions.get(home)
        grants = 0
        homes = self._sessions
        while queue:
            waiter = queue[0]
            if waiter.future.done():
                queues.discard(waiter)
                continue
            assert waiter.session is not None
            if home is not None and homes.get(waiter.session) is home:
                # Still homed here, the common case: what ``_place`` would decide.
                if not _router.can_take(home, waiter.exclusive):
                    break  # the head waits for this worker; so does everyone behind it
                queues.discard(waiter)  # first: sending may serve again
                self._hand_over(waiter, home)
                grants += 1
                continue
            try:
                worker = self._place(waiter.session, waiter.exclusive)
            except CorralError as exc:
                queues.discard(waiter)
                waiter.future.set_exception(exc)
                continue
            if worker is not None:
                queues.discard(waiter)  # first: sending may serve again
                self._hand_over(waiter, worker)
                grants += 1
                continue
            new_home = self._sessions.get(waiter.session)
            if new_home is home:
                break  # the head waits for this worker; so does everyone behind it
            queues.discard(waiter)  # its session moved (its old worker died)
            queues.add(waiter, new_home)
        return grants

    def _hand_over(self, waiter: _Waiter, worker: WorkerHandle) -> None:
        """Give ``worker``'s slot to ``waiter``: its caller's, or its queued call sent on it."""
        if waiter.send is None:
            self._grant(waiter, worker)
        else:
            self._send_queued(waiter, worker)

    @staticmethod
    def _grant(waiter: _Waiter, worker: WorkerHandle) -> None:
        worker.reserve(waiter.exclusive)
        waiter.future.set_result(worker)

    def _send_queued(self, waiter: _Waiter, worker: WorkerHandle) -> None:
        """Send a queued call on the slot granted to it; its caller hears the outcome."""
        assert waiter.send is not None
        if waiter.timer is not None:
            waiter.timer.cancel()  # from here the call's own deadline timer runs
            waiter.timer = None
        worker.reserve(False)
        waiter.worker = worker
        try:
            waiter.pending = waiter.send(worker, waiter.future)
        except CorralError as exc:  # nothing sent, the slot given back: the caller's error
            if isinstance(exc, SessionLost):
                self._sessions.told_lost(waiter.session)  # told now: only once
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    def _set_claim(self, worker: WorkerHandle | None) -> None:
        current = self.claimed
        if current is worker:
            return
        if current is not None:
            current.claimed = False
        if worker is not None and worker.state.accepting:
            worker.claimed = True
            self.claimed = worker
        else:
            self.claimed = None

    # --- watching for changes ---------------------------------------------------------

    def wake_watchers(self, _worker: WorkerHandle | None = None) -> None:
        """Wake every ``wait_until`` so it checks its condition again."""
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    async def wait_until(self, condition: Callable[[], bool], timeout: float | None) -> bool:
        """Wait, woken by every change of the pool, until ``condition()``; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not condition():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            watcher = loop.create_future()
            self._watchers.append(watcher)
            try:
                await asyncio.wait_for(watcher, remaining)
            except TimeoutError:
                return condition()
        return True
