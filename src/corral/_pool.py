"""The Pool: callers, the wait queue, sessions, checkout, supervision, shutdown.

Owns: the public Pool API; which callers wait and in what order; the session ->
worker map and lost sessions; starting, replacing and stopping workers; the
restart budget. Decisions come from ``_router`` (pure); the per-process work is
in ``_handle``. Must not touch: the wire format or process signals directly.

Accounting rule: every slot a caller takes is given back synchronously, on
every path (result, error, timeout, cancellation), so no exit path needs to
await and none can leak. Anything that must wait (a Cancel's acknowledgement,
an eviction) is the handle's, bounded by its own timers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import itertools
import os
import random
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Self, cast

from . import _router
from ._config import PoolConfig
from ._door import (
    check_count,
    check_method,
    check_session,
    check_session_required,
    check_target,
    check_timeout,
    running_loop,
)
from ._errors import (
    CallTimeout,
    CorralError,
    EncodeError,
    PayloadTooLarge,
    PoolClosed,
    PoolFailed,
    PoolOverloaded,
    PoolTimeout,
    RemoteError,
    SessionLost,
    WorkerCrashed,
    WorkerStartError,
    counts_against_restart_budget,
    describe_exit,
)
from ._handle import _END, PendingCall, WorkerHandle
from ._launcher import Launcher, LocalLauncher, WorkerSpec
from ._log import Repeats, get_logger
from ._shm import new_pool_prefix, unlink_segments
from ._state import WorkerState
from ._stats import LatencyRecorder, PoolStats
from ._status import EvictionLog, PoolStatus, QueueInfo, build_status
from ._tracing import CallSpan, CallTracer

__all__ = ["CallStream", "Pool", "WorkerLease"]

_pool_numbers = itertools.count(1)
_LOST_SESSIONS_KEPT = 10_000
_fork_generation = 0
_clock = time.perf_counter
# Errors that leave the worker as it was: the caller's (or its handler's) own.
_CALLER_ERRORS: tuple[type[CorralError], ...] = (RemoteError, EncodeError, PayloadTooLarge)


_started_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for pool in list(_started_pools):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_dead(worker: WorkerHandle) -> bool:
    return worker.state is WorkerState.DEAD


class _Waiter:
    __slots__ = ("exclusive", "future", "home", "method", "queued", "session")

    def __init__(
        self,
        future: asyncio.Future[WorkerHandle],
        session: str | None,
        exclusive: bool,
        method: str | None,
    ) -> None:
        self.future = future
        self.session = session
        self.exclusive = exclusive
        self.method = method
        self.queued = False
        self.home: WorkerHandle | None = None  # a session waiter's worker when queued


class _WaitQueues:
    """Callers waiting for a worker, by what they wait for; each queue is FIFO.

    Session callers queue by the worker that holds their session (their home),
    so a slot freed on one worker is offered to that worker's queue alone.
    """

    __slots__ = ("_session_counts", "exclusive", "plain", "sessions")

    def __init__(self) -> None:
        self.plain: collections.deque[_Waiter] = collections.deque()
        self.exclusive: collections.deque[_Waiter] = collections.deque()
        self.sessions: dict[WorkerHandle | None, collections.deque[_Waiter]] = {}
        self._session_counts: collections.Counter[str] = collections.Counter()

    def _queue_of(self, waiter: _Waiter) -> collections.deque[_Waiter]:
        if waiter.session is not None:
            return self.sessions[waiter.home]
        return self.exclusive if waiter.exclusive else self.plain

    def has_waiters_like(self, session: str | None, exclusive: bool) -> bool:
        """Whether a new request of this kind must queue behind earlier ones."""
        if session is not None:
            return self._session_counts[session] > 0
        return bool(self.exclusive) if exclusive else bool(self.plain or self.exclusive)

    def add(self, waiter: _Waiter, home: WorkerHandle | None = None) -> None:
        waiter.queued = True
        if waiter.session is not None:
            waiter.home = home
            self._session_counts[waiter.session] += 1
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
        self._session_counts[waiter.session] -= 1
        if not self._session_counts[waiter.session]:
            del self._session_counts[waiter.session]
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


class Pool:
    """A pool of worker processes serving one ``corral.worker.App``.

    ``target`` is ``"package.module:app"``. Options are those of PoolConfig
    (``size``, ``python``, ``env``, ``cwd``, ``max_concurrency``,
    ``call_timeout``, ...). Use ``async with Pool(...) as pool`` or the explicit
    ``await pool.start()`` / ``await pool.aclose()``.
    """

    def __init__(
        self,
        target: str,
        *,
        config: PoolConfig | None = None,
        launcher: Launcher | None = None,
        name: str | None = None,
        **options: Any,
    ) -> None:
        self.config = (
            (config or PoolConfig()).replace(**options) if options else (config or PoolConfig())
        )
        self.target = check_target(target, python=self.config.python)
        if name is not None and (not isinstance(name, str) or not name.isprintable()):
            raise TypeError(f"name must be a printable str, got {name!r}")
        self.name = name or f"pool{next(_pool_numbers)}"
        self._launcher: Launcher = launcher or LocalLauncher()
        self._shm_prefix = new_pool_prefix()  # large-buffer segments: /dev/shm/<prefix><n>-*
        self._log = get_logger("corral").bind(pool=self.name)
        # call.failed storms (load shed, a pool down) log a count per second, not a line per call
        self._failures_log = Repeats(self._log)
        self._fork_generation = _fork_generation
        self._workers: list[WorkerHandle] = []
        self._queues = _WaitQueues()
        self._claimed: WorkerHandle | None = None  # drained for a waiting checkout
        self._sessions: dict[str, WorkerHandle] = {}
        self._lost_sessions: dict[str, str] = {}  # session -> why, oldest first
        self._worker_numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = "new"  # new -> starting -> open -> closing -> closed
        self._close_task: asyncio.Task[None] | None = None
        self._idle_event: asyncio.Event | None = None
        self._wake_supervisor: asyncio.Event | None = None
        self._start_failures: collections.deque[float] = collections.deque()
        self._consecutive_failures = 0
        self._failed: WorkerStartError | None = None
        self._last_start_error: WorkerStartError | None = None
        self._restarts = 0
        self._failed_starts = 0
        self._placement_failures = 0
        self._calls_ok = 0
        self._calls_failed: collections.Counter[str] = collections.Counter()
        self._calls_cancelled = 0
        self._latency = LatencyRecorder()
        self._tracer: CallTracer | None = None  # set by corral.otel.instrument()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it was started on
        self._recent_deaths: collections.deque[float] = collections.deque()
        self._watchers: list[asyncio.Future[None]] = []  # woken on any change
        self._recycles = 0
        self._evictions = EvictionLog()  # for status(): workers that left while open
        self._target = self.config.size  # workers wanted now: min_size..max_size
        self._last_grow = 0.0
        # session -> last use (monotonic), kept only when session_ttl is set
        self._session_used: dict[str, float] | None = (
            {} if self.config.session_ttl is not None else None
        )

    # --- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the workers: the first alone (a bad target fails fast), then the rest.

        Raises WorkerStartError, with the worker's stderr tail, if the first
        worker cannot start; the pool is then closed.
        """
        self._check_fork()
        loop = running_loop("Pool.start()")
        if self._state != "new":
            raise PoolClosed(f"pool {self.name} was already started")
        self._state = "starting"
        self._loop = loop
        _started_pools.add(self)
        self._idle_event = asyncio.Event()
        self._wake_supervisor = asyncio.Event()
        self._log.info("pool.starting", target=self.target, size=self.config.size)
        try:
            first = self._new_worker()
            await first.start(self.config.startup_timeout)
            rest = [self._new_worker() for _ in range(self.config.size - 1)]
            results = await asyncio.gather(
                *(w.start(self.config.startup_timeout) for w in rest), return_exceptions=True
            )
        except BaseException:
            self._state = "open"
            await self.aclose()
            raise
        for worker, outcome in zip(rest, results, strict=True):
            if isinstance(outcome, BaseException):
                self._start_failed(worker, outcome)
        for worker in self._workers:
            self._check_fresh_memory(worker)
        self._state = "open"
        self._spawn_task(self._supervise(), "supervisor")
        self._dispatch()
        self._log.info("pool.started", ready=sum(w.state.accepting for w in self._workers))

    async def aclose(self) -> None:
        """Close the pool: refuse new work, drain calls in flight, stop every worker.

        Bounded by drain_timeout + shutdown_grace + kill_grace (+ a few seconds);
        idempotent; safe to call from several tasks. When it returns, no worker
        process of this pool is left.
        """
        if self._state == "new":
            self._state = "closed"
            return
        if self._fork_generation != _fork_generation:
            return  # the parent's workers are the parent's to close
        if self._close_task is None:
            self._state = "closing"  # refuse new calls from this moment on
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._log.info("pool.closing")
        self._queues.fail_all(PoolClosed(f"pool {self.name} is closing"))
        self._dispatch()  # wakes wait_ready() callers, which now see the pool closing
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        workers = list(self._workers)
        if any(w.inflight for w in workers):
            assert self._idle_event is not None
            self._idle_event.clear()
            self._dispatch()
            try:
                await asyncio.wait_for(self._idle_event.wait(), self.config.drain_timeout)
            except TimeoutError:
                self._log.warning("pool.drain_timeout", inflight=sum(w.inflight for w in workers))
        await asyncio.gather(
            *(w.shutdown(self.config.shutdown_grace, self.config.kill_grace) for w in workers)
        )
        close_launcher = getattr(self._launcher, "aclose", None)  # its preload templates
        if close_launcher is not None:
            await close_launcher()
        self._workers.clear()
        self._sessions.clear()
        unlink_segments(self._shm_prefix)  # each worker's exit did; this catches any stray
        self._state = "closed"
        self._failures_log.flush()
        self._log.info("pool.closed")

    # --- public calls -------------------------------------------------------------

    async def call(
        self,
        method: str,
        /,
        *args: Any,
        session: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Run ``method(*args, **kwargs)`` on a worker and return its result.

        ``session`` pins the call to the worker holding that session's state.
        ``timeout`` is one deadline for the wait, the wire and the work.
        ``retries`` re-runs the call on another worker after WorkerCrashed, up to
        that many times within the deadline: only for idempotent methods. It is
        never retried after a RemoteError, nor after SessionLost (the state is gone).
        """
        # One coroutine frame on the hot path: no worker to wait for means no await
        # before the call is on the wire.
        method, session = check_method(method), check_session(session)
        if type(retries) is not int or retries < 0:
            check_count(retries, "retries")
        started = _clock()
        span = None if self._tracer is None else self._tracer.start(method, session, False)
        try:
            deadline = self._deadline(timeout)
            attempt = 0
            while True:
                worker = self._acquire_now(session)
                if worker is None:
                    worker = await self._acquire(session, False, deadline, method)
                if self._session_used is not None:
                    self._touch_session(session)
                if span is not None:
                    span.placed(worker.id, worker.pid)
                try:
                    pending = worker.send_call(
                        method,
                        args,
                        kwargs,
                        session=session,
                        deadline=deadline,
                        trace=None if span is None else span.traceparent,
                    )
                except SessionLost:
                    self._lost_sessions.pop(session or "", None)  # told now: only once
                    raise
                try:
                    result = await pending.future
                except asyncio.CancelledError:
                    worker.cancel(pending)
                    raise
                except WorkerCrashed as exc:
                    if attempt >= retries or isinstance(exc, SessionLost):
                        raise
                    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                        raise
                    attempt += 1
                    self._log.info(
                        "call.retrying", method=method, attempt=attempt, error=exc.message
                    )
                    continue
                self._calls_ok += 1
                self._latency.record(_clock() - started)
                if span is not None:
                    span.end(None)
                return result
        except BaseException as exc:
            self._call_ended(exc, method, session, started, span)
            raise

    def _call_ended(
        self,
        exc: BaseException,
        method: str,
        session: str | None,
        started: float | None,
        span: CallSpan | None,
    ) -> None:
        """Count and log a call or stream that ended with ``exc``, and close its span.

        ``started`` is when a call began (its time goes into the histogram);
        None for a stream.
        """
        if isinstance(exc, CorralError):
            self._calls_failed[type(exc).__name__] += 1
            if started is not None:
                self._latency.record(_clock() - started)
            level = "info" if isinstance(exc, _CALLER_ERRORS) else "warning"
            remote = {"remote_type": exc.type} if isinstance(exc, RemoteError) else {}
            self._failures_log.log(
                level,
                (type(exc), method, remote.get("remote_type")),
                "call.failed",
                method=method,
                call_id=exc.call_id,
                worker_id=exc.worker_id,
                pid=exc.pid,
                session=session,
                error_type=type(exc).__name__,
                error=exc.message,
                **remote,
            )
        elif isinstance(exc, asyncio.CancelledError):
            self._calls_cancelled += 1
        if span is not None:
            span.end(exc)

    def _acquire_now(self, session: str | None) -> WorkerHandle | None:
        """The fast path of ``_acquire``: a slot free now, and nobody queued before us."""
        if self._state != "open" or self._fork_generation != _fork_generation:
            return None  # let _acquire raise the right error
        if self._queues.has_waiters_like(session, False):
            return None
        worker = self._place(session, False)  # may raise SessionLost, once
        if worker is not None:
            worker.reserve(False)
        return worker

    def stream(
        self,
        method: str,
        /,
        *args: Any,
        session: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> CallStream:
        """Iterate over what a generator handler yields: ``async for x in pool.stream(...)``.

        Breaking out of the loop (or ``aclose()``) stops the handler in the worker.
        """
        method, session = check_method(method), check_session(session)
        return CallStream(self, None, method, args, kwargs, session, self._deadline(timeout))

    def checkout(self, *, session: str | None = None, timeout: float | None = None) -> _Checkout:
        """Lease one worker for the length of an ``async with`` block.

        No other call uses that worker until the block ends. ``timeout`` bounds
        only the wait for a worker (PoolTimeout). On exit a failed worker is
        evicted; a call still in flight is cancelled in the worker.
        """
        return _Checkout(self, check_session(session), check_timeout(timeout))

    async def close_session(self, session: str) -> None:
        """Drop a session's state in its worker; the next call starts it afresh."""
        session = check_session_required(session)
        self._check_fork()
        self._lost_sessions.pop(session, None)
        self._end_session(session)

    def _touch_session(self, session: str | None) -> None:
        """Note that a session is in use now (for session_ttl)."""
        if self._session_used is not None and session is not None:
            self._session_used[session] = time.monotonic()

    def _end_session(self, session: str) -> None:
        if self._session_used is not None:
            self._session_used.pop(session, None)
        worker = self._sessions.pop(session, None)
        if worker is None:
            return
        worker.end_session(session)
        if worker.recycle_pending is not None and not worker.sessions:
            self._recycle(worker, worker.recycle_pending)
        self._dispatch()

    def stats(self) -> PoolStats:
        """A snapshot of the pool's workers, waiters, sessions, counters and latencies.

        Call it on the pool's event loop (``corral.prometheus`` does that for you
        from a scrape thread).
        """
        counts = collections.Counter(w.state for w in self._workers)
        return PoolStats(
            size=self._target,
            starting=counts[WorkerState.STARTING],
            idle=counts[WorkerState.READY],
            busy=counts[WorkerState.BUSY],
            draining=counts[WorkerState.DRAINING],
            stopping=counts[WorkerState.STOPPING],
            leased=sum(w.leased for w in self._workers),
            inflight=sum(w.inflight for w in self._workers),
            waiting=len(self._queues),
            sessions=len(self._sessions),
            restarts=self._restarts,
            recycles=self._recycles,
            failed_starts=self._failed_starts,
            failed=self._failed is not None and not any(w.state.accepting for w in self._workers),
            closed=self._state in ("closing", "closed"),
            calls_ok=self._calls_ok,
            calls_failed=dict(self._calls_failed),
            calls_cancelled=self._calls_cancelled,
            placement_failures=self._placement_failures,
            latency=self._latency.snapshot(),
        )

    async def reload(self, *, timeout: float | None = 120.0) -> None:
        """Replace every worker, one at a time, without failing a call.

        Each worker in turn stops taking calls, finishes the ones it has, and is
        replaced by a fresh one started from the same target (so new code or a
        new model is picked up). Sessions held by a replaced worker are lost:
        their next call gets SessionLost. ``timeout`` bounds each replacement.
        With ``preload``, a new template imports the preloaded modules first,
        and the replacements are forked from it.
        """
        timeout = check_timeout(timeout)
        self._check_open()
        refresh = getattr(self._launcher, "refresh", None)  # preloaded modules: new code too
        if refresh is not None:
            await refresh()
        for worker in [w for w in self._workers if w.state.accepting]:
            if worker not in self._workers or not worker.state.accepting:
                continue
            self._recycle(worker, "reload", hard=True)
            self._log.info("pool.reloading", worker_id=worker.id, pid=worker.pid)
            if not await self._wait_until(functools.partial(_is_dead, worker), timeout):
                raise PoolTimeout(f"worker {worker.id} did not finish its calls within {timeout}s")
            await self.wait_ready(timeout=timeout)

    async def wait_ready(self, count: int | None = None, *, timeout: float | None = None) -> None:
        """Wait until ``count`` workers (default: ``size``) are ready to take calls.

        Raises PoolTimeout past ``timeout``, PoolClosed if the pool closes, and
        PoolFailed if it fails while waiting.
        """
        timeout = check_timeout(timeout)
        want = self._target if count is None else check_count(count, "count")

        def ready() -> bool:
            self._check_open()
            live = sum(w.state.accepting for w in self._workers)
            if self._failed is not None and live == 0:
                raise self._pool_failed()
            return live >= want

        if not await self._wait_until(ready, timeout):
            live = sum(w.state.accepting for w in self._workers)
            raise PoolTimeout(f"{live} of {want} workers ready after {timeout}s")

    async def wait_idle(self, *, timeout: float | None = None) -> None:
        """Wait until no call is in flight (cancelled calls acknowledged included).

        Raises PoolTimeout past ``timeout``.
        """
        timeout = check_timeout(timeout)
        self._check_fork()
        if not await self._wait_until(lambda: not any(w.inflight for w in self._workers), timeout):
            raise PoolTimeout(f"calls still in flight after {timeout}s")

    async def _wait_until(self, condition: Callable[[], bool], timeout: float | None) -> bool:
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

    @property
    def workers(self) -> tuple[WorkerHandle, ...]:
        """The live worker handles (read-only view, for inspection)."""
        return tuple(self._workers)

    def status(self, *, rss: bool = False) -> PoolStatus:
        """A snapshot worker by worker, with the wait queue and the recent evictions.

        For status pages (``corral.asgi.status_app``) and ``corral top``; cheap
        enough to take every second. ``rss=True`` also reads each worker's
        resident memory from /proc (one small read per worker).
        """
        stats = self.stats()
        queues = self._queues
        plain, exclusive = len(queues.plain), len(queues.exclusive)
        return build_status(
            name=self.name,
            target=self.target,
            state="failed" if stats.failed else self._state,
            workers=self._workers,
            queue=QueueInfo(
                calls=plain, checkouts=exclusive, sessions=len(queues) - plain - exclusive
            ),
            evictions=self._evictions,
            stats=stats,
            rss=rss,
        )

    def __repr__(self) -> str:
        s = self.stats()
        state = self._state if self._state != "open" else ""
        if s.failed:
            state = "failed"
        return (
            f"<corral.Pool {self.name} {self.target!r}{' ' + state if state else ''} "
            f"[{s.idle} idle, {s.busy} busy, {s.starting} starting | {s.waiting} waiting | "
            f"{s.sessions} sessions]>"
        )

    # --- placement and waiting ------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = check_timeout(timeout)
        if timeout is None:
            timeout = self.config.call_timeout
        if timeout is None:
            return None
        return asyncio.get_running_loop().time() + timeout

    def _check_fork(self) -> None:
        if self._fork_generation != _fork_generation:
            raise PoolClosed(
                f"pool {self.name} was started in the parent of this forked process; a "
                "forked child cannot use it (its workers and pipes belong to the parent). "
                "Create the pool in the child, after the fork."
            )

    def _forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's workers without touching them."""
        for worker in self._workers:
            worker.forget_after_fork()
        forget = getattr(self._launcher, "forget_after_fork", None)
        if forget is not None:
            forget()

    def _check_open(self) -> None:
        self._check_fork()
        if self._state != "open":
            raise PoolClosed(
                f"pool {self.name} is {'not started' if self._state == 'new' else self._state}"
            )

    def _place(self, session: str | None, exclusive: bool) -> WorkerHandle | None:
        """Which worker takes this request now, or None to wait (router rules 1-4)."""
        if session is None:
            return _router.pick_for_call(self._workers, exclusive)
        home = self._sessions.get(session)
        if home is None:
            why = self._lost_sessions.pop(session, None)
            if why is not None:
                raise SessionLost(f"session {session!r} is lost: {why}", session=session)
            home = _router.pick_session_home(self._workers, self.config.max_sessions_per_worker)
            if home is None:
                return None
            self._sessions[session] = home
            home.sessions.add(session)
            self._log.info("session.opened", session=session, worker_id=home.id, pid=home.pid)
        return home if _router.can_take(home, exclusive) else None

    async def _acquire(
        self, session: str | None, exclusive: bool, deadline: float | None, method: str | None
    ) -> WorkerHandle:
        """Wait for a worker and claim a slot on it (the whole worker if exclusive)."""
        self._check_open()
        queues = self._queues
        if not queues.has_waiters_like(session, exclusive):
            worker = self._place(session, exclusive)
            if worker is not None:
                worker.reserve(exclusive)
                return worker
        if self._failed is not None and not any(w.state.accepting for w in self._workers):
            raise self._pool_failed()
        if self.config.max_waiting is not None and len(queues) >= self.config.max_waiting:
            raise PoolOverloaded(
                f"pool {self.name} has {len(queues)} callers waiting "
                f"(max_waiting={self.config.max_waiting})",
                method=method,
                session=session,
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), session, exclusive, method)
        queues.add(waiter, self._sessions.get(session) if session is not None else None)
        if self._target < self.config.largest and self._wake_supervisor is not None:
            self._wake_supervisor.set()  # callers wait: the pool may grow
        if session is not None or exclusive or _router.pick_for_call(self._workers):
            # A session pins now, a checkout may claim a worker, and a plain
            # caller queued behind callers that are leaving may be served at once.
            self._dispatch()
        elif self._watchers:
            self._wake_watchers()  # a new waiter is a change too
        timer = None
        if deadline is not None and not waiter.future.done():
            timer = loop.call_at(deadline, self._waiter_expired, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().give_back(exclusive)  # granted, but the caller is gone
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.future.done():
                waiter.future.cancel()
            queues.discard(waiter)
            if exclusive and not queues.exclusive:
                self._dispatch()  # a claim held for this caller may be released

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

    def _serve_session_waiters(self, home: WorkerHandle | None) -> None:
        """Offer ``home``'s capacity to the callers whose session lives there, in order."""
        queues = self._queues
        queue = queues.sessions.get(home)
        while queue:
            waiter = queue[0]
            if waiter.future.done():
                queues.discard(waiter)
                continue
            assert waiter.session is not None
            try:
                worker = self._place(waiter.session, waiter.exclusive)
            except CorralError as exc:
                queues.discard(waiter)
                waiter.future.set_exception(exc)
                continue
            if worker is not None:
                queues.discard(waiter)
                self._grant(waiter, worker)
                continue
            new_home = self._sessions.get(waiter.session)
            if new_home is home:
                break  # the head waits for this worker; so does everyone behind it
            queues.discard(waiter)  # its session moved (its old worker died)
            queues.add(waiter, new_home)

    def _grant(self, waiter: _Waiter, worker: WorkerHandle) -> None:
        worker.reserve(waiter.exclusive)
        waiter.future.set_result(worker)

    def _dispatch(self, _worker: WorkerHandle | None = None) -> None:
        """Hand free capacity to waiters. Synchronous; called on every capacity change.

        Session waiters first (each can only use its own worker), then checkouts
        (which need an idle worker: if none is, one worker is claimed and takes
        no new calls until it drains, so checkouts cannot starve), then plain
        calls, oldest first.
        """
        if _worker is not None:
            limit = _worker.recycle_after
            if limit is not None and _worker.calls_served >= limit and _worker.state.accepting:
                self._recycle(_worker, f"served {_worker.calls_served} calls (max_requests)")
            if (
                _worker.state is WorkerState.DRAINING
                and not _worker.inflight
                and not _worker.closing
                and self._state == "open"
            ):
                self._spawn_task(
                    _worker.shutdown(self.config.shutdown_grace, self.config.kill_grace), "recycle"
                )
        queues = self._queues
        workers = self._workers
        if queues.sessions:
            if _worker is not None and _worker.state.accepting:
                self._serve_session_waiters(_worker)
            else:
                for home in list(queues.sessions):
                    self._serve_session_waiters(home)
        exclusive = queues.exclusive
        while exclusive:
            waiter = exclusive[0]
            if not waiter.future.done():
                worker = _router.pick_for_call(workers, exclusive=True)
                if worker is None:
                    break
                self._set_claim(None)
                self._grant(waiter, worker)
            exclusive.popleft().queued = False
        if not exclusive:
            self._set_claim(None)
        elif self._claimed is None or not _router.can_claim(self._claimed):
            self._set_claim(_router.pick_claim(workers))
        plain = queues.plain
        while plain:
            waiter = plain[0]
            if not waiter.future.done():
                worker = _router.pick_for_call(workers)
                if worker is None:
                    break
                self._grant(waiter, worker)
            plain.popleft().queued = False
        if (
            self._state == "closing"
            and self._idle_event is not None
            and not any(w.inflight for w in workers)
        ):
            self._idle_event.set()  # aclose() drains until this
        if self._watchers:
            self._wake_watchers()

    def _wake_watchers(self, _worker: WorkerHandle | None = None) -> None:
        """Wake every ``_wait_until`` so it checks its condition again."""
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    def _set_claim(self, worker: WorkerHandle | None) -> None:
        current = self._claimed
        if current is worker:
            return
        if current is not None:
            current.claimed = False
        if worker is not None and worker.state.accepting:
            worker.claimed = True
            self._claimed = worker
        else:
            self._claimed = None

    def _pool_failed(self) -> PoolFailed:
        cause = self._failed or self._last_start_error
        return PoolFailed(
            f"pool {self.name} is failed: workers keep failing to start "
            f"({len(self._start_failures)} failed starts in {self.config.restart_window}s); "
            f"last: {cause.message if cause else 'unknown'}",
            exit_code=cause.exit_code if cause else None,
            stderr_tail=cause.stderr_tail if cause else None,
        )

    # --- supervision ------------------------------------------------------------------

    def _new_worker(self) -> WorkerHandle:
        number = next(self._worker_numbers)
        worker_id = f"{self.name}-w{number}"
        spec = WorkerSpec(
            worker_id=worker_id,
            target=self.target,
            python=self.config.python,
            env=self.config.env,
            env_allowlist=cast("tuple[str, ...] | None", self.config.env_allowlist),
            single_threaded_math=self.config.single_threaded_math,
            cwd=self.config.cwd,
            max_message_size=self.config.max_message_size,
            preload=cast("tuple[str, ...]", self.config.preload),
            startup_timeout=self.config.startup_timeout,
            large_buffer_threshold=self.config.large_buffer_threshold or 0,
            # No prefix when the path is off: nothing to unlink when the worker ends.
            shm_prefix=f"{self._shm_prefix}{number}-" if self.config.large_buffer_threshold else "",
        )
        worker = WorkerHandle(
            spec,
            self._launcher,
            max_concurrency=self.config.max_concurrency,
            cancel_grace=self.config.cancel_grace,
            on_capacity=self._dispatch,
            on_exit=self._worker_exited,
            on_output=self._wake_watchers,
            pool_name=self.name,
            rlimits=self.config.worker_rlimits,
        )
        cfg = self.config
        if cfg.max_requests is not None:
            spread = cfg.max_requests * cfg.recycle_jitter
            worker.recycle_after = max(1, round(cfg.max_requests + random.uniform(-spread, spread)))
        worker.memory_limit = cfg.max_memory_hard or cfg.max_memory
        self._workers.append(worker)
        return worker

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"corral:{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_failed(self, worker: WorkerHandle, error: BaseException) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        now = time.monotonic()
        self._failed_starts += 1
        self._consecutive_failures += 1  # backoff grows either way
        # The restart budget's one rule: only the worker's own failures count
        # (not a placement, a lost node or a flooded listener: PlacementError).
        counted = counts_against_restart_budget(error)
        if counted:
            self._start_failures.append(now)
        else:
            self._placement_failures += 1
        while self._start_failures and self._start_failures[0] < now - self.config.restart_window:
            self._start_failures.popleft()
        if not isinstance(error, WorkerStartError):
            error = WorkerStartError(
                f"worker {worker.id} failed to start: {error!r}", worker_id=worker.id
            )
        self._last_start_error = error
        self._log.warning(
            "worker.start_failed" if counted else "worker.placement_failed",
            worker_id=worker.id,
            pid=worker.pid,
            error=error.message,
            **({} if counted else {"cause": getattr(error, "cause", None)}),
        )
        if self._state in ("starting", "open"):
            self._evictions.start_failed(worker, error.message)
        if len(self._start_failures) > self.config.max_restarts and self._failed is None:
            self._failed = error
            self._log.error("pool.failed", failed_starts=len(self._start_failures))
        if self._failed is not None and not any(w.state.accepting for w in self._workers):
            self._queues.fail_all(self._pool_failed())
        if self._wake_supervisor is not None:
            self._wake_supervisor.set()
        self._dispatch()

    def _worker_exited(self, worker: WorkerHandle) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        why = (
            worker.kill_reason
            or worker.recycle_reason
            or f"its worker {worker.id} died ({describe_exit(worker.exit_code)})"
        )
        hook = self.config.on_session_lost
        for session in worker.sessions:
            if self._sessions.get(session) is worker:
                del self._sessions[session]
                if self._session_used is not None:
                    self._session_used.pop(session, None)
                if session not in worker.sessions_reported_lost:
                    self._lost_sessions[session] = why
                if self._state != "open":
                    continue  # the pool is closing: nothing is lost that was not let go
                self._log.warning(
                    "session.lost", session=session, worker_id=worker.id, pid=worker.pid, why=why
                )
                if hook is not None:
                    self._run_hook(
                        hook,
                        session,
                        SessionLost(
                            f"session {session!r} is lost: {why}",
                            worker_id=worker.id,
                            pid=worker.pid,
                            exit_code=worker.exit_code,
                            session=session,
                        ),
                    )
        while len(self._lost_sessions) > _LOST_SESSIONS_KEPT:
            del self._lost_sessions[next(iter(self._lost_sessions))]
        if self._state == "open":
            self._evictions.worker_left(worker)
        if self._state == "open" and worker.recycle_reason is None:
            self._recent_deaths.append(time.monotonic())
            if self._wake_supervisor is not None:
                self._wake_supervisor.set()
        self._dispatch()

    def _backoff(self) -> float:
        """Seconds to wait before the next start: grows while starts fail or deaths come fast."""
        cfg = self.config
        now = time.monotonic()
        while self._recent_deaths and self._recent_deaths[0] < now - 1.0:
            self._recent_deaths.popleft()
        exponent = self._consecutive_failures
        if len(self._recent_deaths) > self._target:  # a crash storm: slow down replacements
            exponent = max(exponent, len(self._recent_deaths) - self._target)
        if exponent == 0:
            return 0.0
        return float(min(cfg.restart_backoff_max, cfg.restart_backoff * 2 ** (exponent - 1)))

    async def _supervise(self) -> None:
        """Keep `size` workers, replace the dead with backoff, and send heartbeats."""
        try:
            await self._supervise_forever()
        except asyncio.CancelledError:
            if self._state == "open":
                # Cancelled from outside while open: the event loop is being torn
                # down (asyncio.run ending) and aclose() was never called. Kill
                # every worker now, since nothing will run after this.
                warnings.warn(
                    f"{self!r} was never closed; its workers were killed as the event "
                    "loop shut down. Use `async with Pool(...)` or `await pool.aclose()`.",
                    ResourceWarning,
                    stacklevel=1,
                )
                self._state = "closed"
                for worker in self._workers:
                    worker.abandon()
                abandon = getattr(self._launcher, "abandon", None)
                if abandon is not None:
                    abandon()
            raise

    async def _supervise_forever(self) -> None:
        assert self._wake_supervisor is not None
        wake = self._wake_supervisor
        cfg = self.config
        next_beat = time.monotonic() + cfg.heartbeat_interval
        while self._state == "open":
            now = time.monotonic()
            next_grow = self._maybe_grow(now)
            missing = self._target - self._serving_count()
            if missing > 0:
                delay = self._backoff()
                if delay:
                    await asyncio.sleep(delay)
                    if self._state != "open":
                        return
                    missing = self._target - self._serving_count()
                for _ in range(max(0, missing)):
                    self._restarts += 1
                    self._spawn_task(self._replace(self._new_worker()), "start")
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat(now)
                self._check_recycling(now)
                self._expire_sessions(now)
                self._retire_idle(now)
                next_beat = now + cfg.heartbeat_interval
            wake.clear()
            until = min(next_beat, next_grow) if next_grow is not None else next_beat
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0, until - time.monotonic()))

    async def _replace(self, worker: WorkerHandle) -> None:
        try:
            await worker.start(self.config.startup_timeout)
        except (WorkerStartError, OSError) as exc:
            self._start_failed(worker, exc)
            return
        self._consecutive_failures = 0
        self._check_fresh_memory(worker)
        if self._wake_supervisor is not None:
            self._wake_supervisor.set()  # callers may still wait: grow again?
        if self._failed is not None:
            self._log.info("pool.recovered", worker_id=worker.id, pid=worker.pid)
            self._failed = None
        self._dispatch()

    def _maybe_grow(self, now: float) -> float | None:
        """Add a worker while callers wait, rate-limited; returns when to look again."""
        cfg = self.config
        if not len(self._queues) or self._target >= cfg.largest:
            return None
        if any(w.state is WorkerState.STARTING for w in self._workers):
            return None  # one start at a time; the next look comes when it is ready
        allowed_at = self._last_grow + 1.0 / cfg.max_spawn_rate
        if now < allowed_at:
            return allowed_at
        self._target += 1
        self._last_grow = now
        self._log.info("pool.growing", size=self._target, waiting=len(self._queues))
        return None

    def _retire_idle(self, now: float) -> None:
        """Stop workers idle past idle_timeout while the pool is above min_size."""
        cfg = self.config
        for worker in list(self._workers):
            if self._target <= cfg.smallest:
                return
            if (
                worker.state is WorkerState.READY
                and not worker.sessions
                and not worker.claimed
                and now - worker.idle_since > cfg.idle_timeout
            ):
                self._target -= 1
                worker.drain(f"idle for {now - worker.idle_since:.1f}s (idle_timeout)")
                self._dispatch(worker)

    def _serving_count(self) -> int:
        """Workers that count toward ``size``: not draining or being recycled."""
        return sum(
            1 for w in self._workers if w.state is not WorkerState.DRAINING and not w.closing
        )

    def _recycle(self, worker: WorkerHandle, reason: str, hard: bool = False) -> None:
        """Make before break: start a replacement, drain this one, then stop it."""
        if not worker.state.accepting or self._state != "open":
            return
        if worker.sessions and not hard:
            if worker.recycle_pending is None:
                worker.recycle_pending = reason
                self._log.info(
                    "worker.recycle_waits_for_sessions", worker_id=worker.id, pid=worker.pid
                )
            return
        if worker.leased:
            worker.recycle_pending = reason  # after the checkout ends
            return
        worker.drain(reason)
        self._recycles += 1
        if self._wake_supervisor is not None:
            self._wake_supervisor.set()
        self._dispatch(worker)

    def _check_recycling(self, now: float) -> None:
        cfg = self.config
        for worker in list(self._workers):
            if not worker.state.accepting:
                continue
            if worker.recycle_pending is not None and not worker.sessions and not worker.leased:
                self._recycle(worker, worker.recycle_pending)
                continue
            if (
                cfg.max_lifetime is not None
                and worker.ready_at is not None
                and now - worker.ready_at > cfg.max_lifetime
            ):
                self._recycle(worker, f"older than max_lifetime={cfg.max_lifetime}s")
                continue
            if cfg.max_memory is None and cfg.max_memory_hard is None:
                continue
            rss = worker.sample_rss()
            if rss is None or worker.memory_exempt:
                continue
            if cfg.max_memory_hard is not None and rss > cfg.max_memory_hard:
                self._recycle(worker, f"RSS {rss} bytes over max_memory_hard", hard=True)
            elif cfg.max_memory is not None and rss > cfg.max_memory:
                self._recycle(worker, f"RSS {rss} bytes over max_memory")

    def _check_fresh_memory(self, worker: WorkerHandle) -> None:
        """A worker over its memory limit from the start is a configuration error."""
        limit = self.config.max_memory
        if limit is None:
            return
        rss = worker.sample_rss()
        if rss is not None and rss > limit:
            worker.memory_exempt = True
            self._log.error(
                "worker.over_memory_limit_when_fresh",
                worker_id=worker.id,
                pid=worker.pid,
                rss=rss,
                max_memory=limit,
                hint="raise max_memory: recycling cannot bring this worker under it",
            )

    def _expire_sessions(self, now: float) -> None:
        ttl = self.config.session_ttl
        if ttl is None or self._session_used is None:
            return
        expired = [s for s, used in self._session_used.items() if now - used > ttl]
        for session in expired:
            home = self._sessions.get(session)
            self._log.info(
                "session.expired",
                session=session,
                idle_seconds=ttl,
                worker_id=None if home is None else home.id,
                pid=None if home is None else home.pid,
            )
            self._end_session(session)

    def _run_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        try:
            outcome = hook(*args)
        except Exception:  # noqa: BLE001 - an application hook must not break the pool
            self._log.exception("pool.hook_failed", hook=getattr(hook, "__name__", repr(hook)))
            return
        if inspect.isawaitable(outcome):

            async def finish() -> None:
                try:
                    await outcome
                except Exception:  # noqa: BLE001 - logged; the pool goes on
                    self._log.exception("pool.hook_failed", hook=getattr(hook, "__name__", "?"))

            self._spawn_task(finish(), "hook")

    def _heartbeat(self, now: float) -> None:
        timeout = self.config.heartbeat_timeout
        for worker in list(self._workers):
            if not worker.state.accepting:
                continue
            silent = worker.silent_for(now)
            if silent > timeout:
                worker.kill(f"missed heartbeats: no answer to a ping for {silent:.1f}s (hung?)")
            else:
                worker.ping()


class WorkerLease:
    """One worker held exclusively inside ``async with pool.checkout()``."""

    def __init__(self, pool: Pool, worker: WorkerHandle, session: str | None) -> None:
        self._pool = pool
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
        self._pool._check_open()

    async def call(
        self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Run a call on this worker (in the checkout's session, if it has one)."""
        method = check_method(method)
        self._check(method)
        pool = self._pool
        pool._touch_session(self.session)
        deadline = pool._deadline(timeout)
        worker = self._worker
        started = _clock()
        span = None if pool._tracer is None else pool._tracer.start(method, self.session, False)
        pending = None
        try:
            if span is not None:
                span.placed(worker.id, worker.pid)
            pending = worker.send_call(
                method,
                args,
                kwargs,
                session=self.session,
                deadline=deadline,
                reserved=False,
                trace=None if span is None else span.traceparent,
            )
            self._pending.add(pending)
            try:
                result = await pending.future
            except asyncio.CancelledError:
                worker.cancel(pending)
                raise
        except BaseException as exc:
            pool._call_ended(exc, method, self.session, started, span)
            raise
        finally:
            if pending is not None:
                self._pending.discard(pending)
        pool._calls_ok += 1
        pool._latency.record(_clock() - started)
        if span is not None:
            span.end(None)
        return result

    def stream(
        self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> CallStream:
        """Stream the items of a handler run on this worker (in the checkout's session).

        The same as ``Pool.stream()``, on the leased worker: iterate the result
        with ``async for``.
        """
        method = check_method(method)
        self._check(method)
        return CallStream(
            self._pool, self, method, args, kwargs, self.session, self._pool._deadline(timeout)
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


class _Checkout:
    """The async context manager returned by ``Pool.checkout()``."""

    def __init__(self, pool: Pool, session: str | None, timeout: float | None) -> None:
        self._pool = pool
        self._session = session
        self._timeout = timeout
        self._lease: WorkerLease | None = None

    async def __aenter__(self) -> WorkerLease:
        pool = self._pool
        deadline = None
        if self._timeout is not None:
            deadline = asyncio.get_running_loop().time() + self._timeout
        worker = await pool._acquire(self._session, True, deadline, None)
        pool._touch_session(self._session)
        self._lease = WorkerLease(pool, worker, self._session)
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
            self._pool._touch_session(self._session)


class CallStream:
    """``async for item in pool.stream(...)``; ``aclose()`` (or break) stops it."""

    def __init__(
        self,
        pool: Pool,
        lease: WorkerLease | None,
        method: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        session: str | None,
        deadline: float | None,
    ) -> None:
        self._pool = pool
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
        pool = self._pool
        if error is None:
            pool._calls_ok += 1
            if self._span is not None:
                self._span.end(None)
        else:
            pool._call_ended(error, self._method, self._session, None, self._span)

    async def _begin(self) -> PendingCall:
        pool = self._pool
        window = pool.config.stream_window
        if pool._tracer is not None:
            self._span = pool._tracer.start(self._method, self._session, True)
        if self._lease is not None:
            self._lease._check(self._method)
            worker = self._lease._worker
            reserved = False
        else:
            worker = await pool._acquire(self._session, False, self._deadline, self._method)
            reserved = True
        pool._touch_session(self._session)
        self._worker = worker
        span = self._span
        if span is not None:
            span.placed(worker.id, worker.pid)
        self._pending = worker.send_call(
            self._method,
            self._args,
            self._kwargs,
            session=self._session,
            deadline=self._deadline,
            stream_window=window,
            reserved=reserved,
            trace=None if span is None else span.traceparent,
        )
        if self._lease is not None:
            self._lease._pending.add(self._pending)
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
