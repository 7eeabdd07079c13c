"""The Pool: the public front over the parts that each own one kind of state.

Owns: the public Pool API and its lifecycle (start, aclose, fork safety), and
nothing else: each kind of state has one owner, which this module wires up.

- ``PoolLifecycle`` (``_pool_state``): the pool's state and its legal moves.
- ``Supervisor`` (``_supervisor``): the workers, their number, restarts,
  recycling, heartbeats, memory, and what happens when one exits.
- ``Dispatcher`` (``_dispatch``): waiting callers and queued calls, the claim,
  and handing out slots (``try_acquire`` / ``acquire`` / ``call_when_free``).
- ``Sessions`` (``_sessions``): which worker holds each session.
- ``CallPath`` (``_calls``): starting calls and counting how they end;
  ``WorkerLease``/``Checkout`` (``_lease``) and ``CallStream`` (``_stream``).
- ``WorkerHandle`` (``_handle``): one worker process and its calls in flight.

Must not touch: the wire format or process signals directly.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import weakref
from types import TracebackType
from typing import Any, Self

from ._calls import CallPath, clock
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
from ._errors import PoolClosed, PoolTimeout, SessionLost, WorkerCrashed, WorkerStartError
from ._handle import PendingCall, WorkerHandle
from ._launch import Launcher, LocalLauncher
from ._lease import Checkout, WorkerLease
from ._log import get_logger
from ._pool_state import PoolLifecycle, PoolState
from ._sessions import Sessions
from ._shm import new_pool_prefix, unlink_segments
from ._state import WorkerState
from ._stats import PoolStats
from ._status import PoolStatus, QueueInfo, build_status
from ._stream import CallStream
from ._supervisor import Supervisor
from ._tracing import CallTracer

__all__ = ["CallStream", "Pool", "WorkerLease"]

_pool_numbers = itertools.count(1)
_started_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_started_pools):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_dead(worker: WorkerHandle) -> bool:
    return worker.state is WorkerState.DEAD


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
        cfg = self.config
        self._launcher: Launcher = launcher or LocalLauncher()
        self._shm_prefix = new_pool_prefix()  # large-buffer segments: /dev/shm/<prefix><n>-*
        self._log = get_logger("corral").bind(pool=self.name)
        self._lifecycle = PoolLifecycle(self.name)
        self._sessions = Sessions(self._log, cfg.session_ttl, cfg.max_sessions_per_worker)
        self._supervisor = Supervisor(
            self.name,
            target,
            cfg,
            self._launcher,
            self._lifecycle,
            self._sessions,
            self._shm_prefix,
            self._log,
        )
        self._dispatcher = self._supervisor.dispatcher
        self._calls = CallPath(self._sessions, cfg.call_timeout, cfg.stream_window, self._log)
        self._close_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it was started on

    @property
    def _failed(self) -> WorkerStartError | None:
        """The start error that spent the restart budget, while it is spent (the supervisor's)."""
        return self._supervisor.budget_spent_by

    @property
    def _tracer(self) -> CallTracer | None:
        """The tracer ``corral.otel.instrument()`` sets: a span per call when set."""
        return self._calls.tracer

    @_tracer.setter
    def _tracer(self, tracer: CallTracer | None) -> None:
        self._calls.tracer = tracer

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
        lifecycle = self._lifecycle
        lifecycle.check_fork()
        lifecycle.begin_start(running_loop("Pool.start()"))
        self._loop = self._calls.loop = lifecycle.loop
        _started_pools.add(self)
        self._log.info("pool.starting", target=self.target, size=self.config.size)
        # A task of the supervisor's, so that aclose() during start cancels it and
        # awaits it like any other: no worker it was starting is left behind.
        starting = self._supervisor.spawn_task(self._supervisor.start(), "first start")
        try:
            await starting
        except BaseException:
            closed_meanwhile = starting.cancelled() and lifecycle.state is not PoolState.STARTING
            await self.aclose()
            if closed_meanwhile:  # aclose() from elsewhere cut the start off
                raise PoolClosed(f"pool {self.name} was closed while it started") from None
            raise
        lifecycle.finish_start()
        self._supervisor.run()
        self._dispatcher.serve()
        self._log.info(
            "pool.started", ready=sum(w.state.accepting for w in self._supervisor.workers)
        )

    async def aclose(self) -> None:
        """Close the pool: refuse new work, drain calls in flight, stop every worker.

        Bounded by drain_timeout + shutdown_grace + kill_grace (+ a few seconds);
        idempotent; safe to call from several tasks. When it returns, no worker
        process of this pool is left.
        """
        lifecycle = self._lifecycle
        if lifecycle.state is PoolState.NEW:
            lifecycle.move(PoolState.CLOSED)
            return
        if lifecycle.forked_away:
            return  # the parent's workers are the parent's to close
        if self._close_task is None:
            if lifecycle.state is not PoolState.CLOSED:
                lifecycle.move(PoolState.CLOSING)  # refuse new calls from this moment on
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._log.info("pool.closing")
        supervisor, dispatcher = self._supervisor, self._dispatcher
        dispatcher.fail_waiters(PoolClosed(f"pool {self.name} is closing"))
        dispatcher.serve()  # wakes wait_ready() callers, which now see the pool closing
        tasks = list(supervisor.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        workers = list(supervisor.workers)
        if any(w.inflight for w in workers):
            drained = dispatcher.drained = asyncio.Event()
            dispatcher.serve()
            try:
                await asyncio.wait_for(drained.wait(), self.config.drain_timeout)
            except TimeoutError:
                self._log.warning("pool.drain_timeout", inflight=sum(w.inflight for w in workers))
        await asyncio.gather(
            *(w.shutdown(self.config.shutdown_grace, self.config.kill_grace) for w in workers)
        )
        await self._launcher.aclose()  # its preload templates
        supervisor.workers.clear()
        self._sessions.clear()
        unlink_segments(self._shm_prefix)  # each worker's exit did; this catches any stray
        self._lifecycle.move(PoolState.CLOSED)
        self._calls.failures_log.flush()
        self._log.info("pool.closed")

    def _forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's workers without touching them."""
        for worker in self._supervisor.workers:
            worker.forget_after_fork()
        self._launcher.forget_after_fork()

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

        The result is the handler's return value as MessagePack carries it; in
        a pool made with ``large_bytes="memoryview"``, bytes over
        ``large_buffer_threshold`` in it arrive as read-only ``memoryview``s of
        shared memory (and so do they in the handler's arguments).
        ``session`` pins the call to the worker holding that session's state.
        ``timeout`` is one deadline for the wait, the wire and the work.
        ``retries`` re-runs the call on another worker after WorkerCrashed, up to
        that many times within the deadline: only for idempotent methods. It is
        never retried after a RemoteError, nor after SessionLost (the state is gone).
        """
        # The path of a call, in one coroutine frame: a slot from the dispatcher
        # (no await when one is free), the call started on its worker, its future
        # awaited, the outcome counted.
        if type(method) is not str or not method.isascii():  # the checks' own fast path, inlined
            method = check_method(method)
        if session is not None:
            session = check_session(session)
        if type(retries) is not int or retries < 0:
            check_count(retries, "retries")
        started = clock()
        calls = self._calls
        span = None if calls.tracer is None else calls.tracer.start(method, session, False)
        try:
            deadline = (
                None
                if timeout is None and calls.call_timeout is None
                else (calls.deadline(timeout))
            )
            attempt = 0
            while True:
                worker = self._dispatcher.try_acquire(session)
                try:
                    if worker is None:
                        # Every slot it could take is taken: the call waits in the queue
                        # as a call, and the dispatcher sends it when a slot frees
                        # (decision 0027).
                        def send(worker: WorkerHandle, future: asyncio.Future[Any]) -> PendingCall:
                            return calls.start(
                                worker, method, args, kwargs, session, deadline, span, future=future
                            )

                        result = await self._dispatcher.call_when_free(
                            session, deadline, method, send
                        )
                    else:
                        try:
                            pending = calls.start(
                                worker, method, args, kwargs, session, deadline, span
                            )
                        except SessionLost:
                            self._sessions.told_lost(session)  # told now: only once
                            raise
                        try:
                            result = await pending.future
                        except asyncio.CancelledError:
                            worker.cancel(pending)
                            raise
                except WorkerCrashed as exc:
                    if attempt >= retries or isinstance(exc, SessionLost):
                        raise
                    loop = calls.loop
                    if deadline is not None and loop is not None and loop.time() >= deadline:
                        raise
                    attempt += 1
                    self._log.info(
                        "call.retrying", method=method, attempt=attempt, error=exc.message
                    )
                    continue
                calls.calls_ok += 1
                calls.latency.record(clock() - started)
                if span is not None:
                    span.end(None)
                return result
        except BaseException as exc:
            calls.ended(exc, method, session, started, span)
            raise

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
        return CallStream(
            self._calls,
            self._dispatcher,
            None,
            method,
            args,
            kwargs,
            session,
            self._calls.deadline(timeout),
        )

    def checkout(self, *, session: str | None = None, timeout: float | None = None) -> Checkout:
        """Lease one worker for the length of an ``async with`` block.

        No other call uses that worker until the block ends. ``timeout`` bounds
        only the wait for a worker (PoolTimeout). On exit a failed worker is
        evicted; a call still in flight is cancelled in the worker.
        """
        return Checkout(
            self._lifecycle,
            self._calls,
            self._dispatcher,
            check_session(session),
            check_timeout(timeout),
        )

    async def close_session(self, session: str) -> None:
        """Drop a session's state in its worker; the next call starts it afresh."""
        session = check_session_required(session)
        self._lifecycle.check_fork()
        self._supervisor.end_session(session)

    # --- reading ------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A snapshot of the pool's workers, waiters, sessions, counters and latencies.

        Call it on the pool's event loop (``corral.prometheus`` does that for you
        from a scrape thread).
        """
        supervisor, calls = self._supervisor, self._calls
        workers = supervisor.workers
        counts = collections.Counter(w.state for w in workers)
        state = self._lifecycle.state
        return PoolStats(
            size=supervisor.size,
            starting=counts[WorkerState.STARTING],
            idle=counts[WorkerState.READY],
            busy=counts[WorkerState.BUSY],
            draining=counts[WorkerState.DRAINING],
            stopping=counts[WorkerState.STOPPING],
            leased=sum(w.leased for w in workers),
            inflight=sum(w.inflight for w in workers),
            waiting=len(self._dispatcher.queues),
            sessions=len(self._sessions),
            restarts=supervisor.restarts,
            recycles=supervisor.recycles,
            failed_starts=supervisor.failed_starts,
            failed=supervisor.failed,
            closed=state in (PoolState.CLOSING, PoolState.CLOSED),
            calls_ok=calls.calls_ok,
            calls_failed=dict(calls.calls_failed),
            calls_cancelled=calls.calls_cancelled,
            placement_failures=supervisor.placement_failures,
            latency=calls.latency.snapshot(),
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
        self._lifecycle.check_open()
        await self._launcher.refresh()  # preloaded modules: new code too
        workers = self._supervisor.workers
        for worker in [w for w in workers if w.state.accepting]:
            if worker not in workers or not worker.state.accepting:
                continue
            self._supervisor.recycle(worker, "reload", hard=True)
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
        supervisor = self._supervisor
        want = supervisor.size if count is None else check_count(count, "count")

        def ready() -> bool:
            self._lifecycle.check_open()
            if supervisor.failed:
                raise supervisor.pool_failed()
            return sum(w.state.accepting for w in supervisor.workers) >= want

        if not await self._wait_until(ready, timeout):
            live = sum(w.state.accepting for w in supervisor.workers)
            raise PoolTimeout(f"{live} of {want} workers ready after {timeout}s")

    async def wait_idle(self, *, timeout: float | None = None) -> None:
        """Wait until no call is in flight (cancelled calls acknowledged included).

        Raises PoolTimeout past ``timeout``.
        """
        timeout = check_timeout(timeout)
        self._lifecycle.check_fork()
        workers = self._supervisor.workers
        if not await self._wait_until(lambda: not any(w.inflight for w in workers), timeout):
            raise PoolTimeout(f"calls still in flight after {timeout}s")

    async def _wait_until(self, condition: Any, timeout: float | None) -> bool:
        """Wait, woken by every change of the pool, until ``condition()``; False on timeout."""
        return await self._dispatcher.wait_until(condition, timeout)

    @property
    def workers(self) -> tuple[WorkerHandle, ...]:
        """The live worker handles (read-only view, for inspection)."""
        return tuple(self._supervisor.workers)

    def status(self, *, rss: bool = False) -> PoolStatus:
        """A snapshot worker by worker, with the wait queue and the recent evictions.

        For status pages (``corral.asgi.status_app``) and ``corral top``; cheap
        enough to take every second. ``rss=True`` also reads each worker's
        resident memory from /proc (one small read per worker).
        """
        stats = self.stats()
        queues = self._dispatcher.queues
        plain, exclusive = len(queues.plain), len(queues.exclusive)
        return build_status(
            name=self.name,
            target=self.target,
            state="failed" if stats.failed else self._lifecycle.state.value,
            workers=self._supervisor.workers,
            queue=QueueInfo(
                calls=plain, checkouts=exclusive, sessions=len(queues) - plain - exclusive
            ),
            evictions=self._supervisor.evictions,
            stats=stats,
            rss=rss,
            recycle_pending=self._supervisor.recycle_pending,
        )

    def __repr__(self) -> str:
        s = self.stats()
        state = self._lifecycle.state
        shown = "" if state is PoolState.OPEN else state.value
        if s.failed:
            shown = "failed"
        return (
            f"<corral.Pool {self.name} {self.target!r}{' ' + shown if shown else ''} "
            f"[{s.idle} idle, {s.busy} busy, {s.starting} starting | {s.waiting} waiting | "
            f"{s.sessions} sessions]>"
        )
