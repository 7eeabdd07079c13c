"""The supervisor: how many workers the pool has, and which ones.

Owns: the worker list (``workers``: who belongs to the pool, in start order),
the size wanted now (``size``: between ``min_size`` and ``max_size``), starting
workers (the spec of each), the restart budget and backoff, growth while
callers wait and retirement of idle workers, recycling (``max_requests``,
``max_lifetime``, ``max_memory``: the per-worker ``RecyclePolicy``),
heartbeats, session expiry on the heartbeat's tick, what happens when a worker
exits (its sessions lost, the ``on_session_lost`` hook), the eviction log and
the restart/recycle counters, and the pool's background tasks. Must not touch:
waiting callers (the dispatcher; the supervisor tells it when capacity
changes), the wire, or a call's outcome.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import random
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

from ._config import PoolConfig
from ._dispatch import Dispatcher
from ._errors import (
    PoolFailed,
    SessionLost,
    WorkerStartError,
    counts_against_restart_budget,
    describe_exit,
)
from ._handle import WorkerHandle
from ._launch import Launcher, WorkerSpec
from ._log import Logger
from ._pool_state import PoolLifecycle, PoolState
from ._sessions import Sessions
from ._state import WorkerState
from ._status import EvictionLog

__all__ = ["RecyclePolicy", "Supervisor"]


class RecyclePolicy:
    """When one worker is to be recycled: the supervisor's, one per worker."""

    __slots__ = ("after_calls", "exempt_from_memory", "pending")

    def __init__(self, after_calls: int | None) -> None:
        self.after_calls = after_calls  # calls served before it is recycled (max_requests)
        self.pending: str | None = None  # due, but waiting for its sessions or checkout
        self.exempt_from_memory = False  # over the limit when fresh: a configuration error


class Supervisor:
    """Keeps ``size`` workers serving: starts, replaces, recycles and retires them."""

    def __init__(
        self,
        name: str,
        target: str,
        config: PoolConfig,
        launcher: Launcher,
        lifecycle: PoolLifecycle,
        sessions: Sessions,
        shm_prefix: str,
        log: Logger,
    ) -> None:
        self._name = name
        self._app_target = target  # "package.module:app"
        self._config = config
        self._launcher = launcher
        self._lifecycle = lifecycle
        self._sessions = sessions
        self._shm_prefix = shm_prefix
        self._log = log
        self.workers: list[WorkerHandle] = []
        self.size = config.size  # workers wanted now: min_size..max_size
        self.dispatcher = Dispatcher(
            lifecycle,
            self.workers,
            sessions,
            max_waiting=config.max_waiting,
            queue_timeout=config.queue_timeout,
            failure=self.failure,
            callers_waiting=self._callers_waiting,
        )
        self._policies: dict[WorkerHandle, RecyclePolicy] = {}
        self._max_requests = config.max_requests  # None: no per-worker check on each call
        self._worker_numbers = itertools.count(1)
        self.tasks: set[asyncio.Task[Any]] = set()
        self._wake: asyncio.Event | None = None
        self._start_failures: collections.deque[float] = collections.deque()
        self._consecutive_failures = 0
        self._failed: WorkerStartError | None = None
        self._last_start_error: WorkerStartError | None = None
        self._recent_deaths: collections.deque[float] = collections.deque()
        self._last_grow = 0.0
        self.restarts = 0
        self.recycles = 0
        self.failed_starts = 0
        self.placement_failures = 0  # failed starts that were the placement's, not the worker's
        self.evictions = EvictionLog()  # for status(): workers that left while open

    # --- reading -------------------------------------------------------------------

    @property
    def budget_spent_by(self) -> WorkerStartError | None:
        """The start error that spent the restart budget; None once a worker starts cleanly."""
        return self._failed

    @property
    def failed(self) -> bool:
        """Too many failed starts and no worker serving: calls fail fast."""
        return self._failed is not None and not any(w.state.accepting for w in self.workers)

    def failure(self) -> PoolFailed | None:
        """The error for callers while the pool is failed, else None."""
        return self.pool_failed() if self.failed else None

    def pool_failed(self) -> PoolFailed:
        cause = self._failed or self._last_start_error
        return PoolFailed(
            f"pool {self._name} is failed: workers keep failing to start "
            f"({len(self._start_failures)} failed starts in {self._config.restart_window}s); "
            f"last: {cause.message if cause else 'unknown'}",
            exit_code=cause.exit_code if cause else None,
            stderr_tail=cause.stderr_tail if cause else None,
        )

    def recycle_pending(self, worker: WorkerHandle) -> str | None:
        """Why ``worker`` is due to be recycled once its sessions end, if it is."""
        policy = self._policies.get(worker)
        return None if policy is None else policy.pending

    def serving_count(self) -> int:
        """Workers that count toward ``size``: not draining or being recycled."""
        return sum(1 for w in self.workers if w.state is not WorkerState.DRAINING and not w.closing)

    # --- starting ------------------------------------------------------------------

    async def start(self) -> None:
        """The first worker alone (a bad target fails fast), then the rest together."""
        config = self._config
        self._wake = asyncio.Event()
        first = self._new_worker()
        await first.start(config.startup_timeout)
        rest = [self._new_worker() for _ in range(config.size - 1)]
        results = await asyncio.gather(
            *(w.start(config.startup_timeout) for w in rest), return_exceptions=True
        )
        for worker, outcome in zip(rest, results, strict=True):
            if isinstance(outcome, BaseException):
                self._start_failed(worker, outcome)
        for worker in self.workers:
            self._check_fresh_memory(worker)

    def run(self) -> None:
        """Start supervising in the background (the pool is open)."""
        self.spawn_task(self._supervise(), "supervisor")

    def _new_worker(self) -> WorkerHandle:
        cfg = self._config
        number = next(self._worker_numbers)
        spec = WorkerSpec(
            worker_id=f"{self._name}-w{number}",
            target=self._app_target,
            python=cfg.python,
            env=cfg.env,
            env_allowlist=cast("tuple[str, ...] | None", cfg.env_allowlist),
            single_threaded_math=cfg.single_threaded_math,
            cwd=cfg.cwd,
            max_message_size=cfg.max_message_size,
            preload=cast("tuple[str, ...]", cfg.preload),
            startup_timeout=cfg.startup_timeout,
            large_buffer_threshold=cfg.large_buffer_threshold or 0,
            # No prefix when the path is off: nothing to unlink when the worker ends.
            shm_prefix=f"{self._shm_prefix}{number}-" if cfg.large_buffer_threshold else "",
            compression=cfg.compression,
            large_bytes_views=cfg.large_bytes == "memoryview",
        )
        worker = WorkerHandle(
            spec,
            self._launcher,
            max_concurrency=cfg.max_concurrency,
            cancel_grace=cfg.cancel_grace,
            on_capacity=self.capacity_changed,
            on_exit=self._worker_exited,
            on_output=self.dispatcher.wake_watchers,
            pool_name=self._name,
            rlimits=cfg.worker_rlimits,
            memory_limit=cfg.max_memory_hard or cfg.max_memory,
        )
        after_calls = None
        if cfg.max_requests is not None:
            spread = cfg.max_requests * cfg.recycle_jitter
            after_calls = max(1, round(cfg.max_requests + random.uniform(-spread, spread)))
        self._policies[worker] = RecyclePolicy(after_calls)
        self.workers.append(worker)
        return worker

    def spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"corral:{self._name}:{name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _remove(self, worker: WorkerHandle) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        self._policies.pop(worker, None)

    def _start_failed(self, worker: WorkerHandle, error: BaseException) -> None:
        self._remove(worker)
        now = time.monotonic()
        self.failed_starts += 1
        self._consecutive_failures += 1  # backoff grows either way
        # The restart budget's one rule: only the worker's own failures count
        # (not a placement, a lost node or a flooded listener: PlacementError).
        counted = counts_against_restart_budget(error)
        if counted:
            self._start_failures.append(now)
        else:
            self.placement_failures += 1
        while self._start_failures and self._start_failures[0] < now - self._config.restart_window:
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
        if self._lifecycle.state in (PoolState.STARTING, PoolState.OPEN):
            self.evictions.start_failed(worker, error.message)
        if len(self._start_failures) > self._config.max_restarts and self._failed is None:
            self._failed = error
            self._log.error("pool.failed", failed_starts=len(self._start_failures))
        if self.failed:
            self.dispatcher.fail_waiters(self.pool_failed())
        self._wake_up()
        self.dispatcher.serve()

    async def _replace(self, worker: WorkerHandle) -> None:
        try:
            await worker.start(self._config.startup_timeout)
        except (WorkerStartError, OSError) as exc:
            self._start_failed(worker, exc)
            return
        self._consecutive_failures = 0
        self._check_fresh_memory(worker)
        self._wake_up()  # callers may still wait: grow again?
        if self._failed is not None:
            self._log.info("pool.recovered", worker_id=worker.id, pid=worker.pid)
            self._failed = None
        self.dispatcher.serve()

    def _check_fresh_memory(self, worker: WorkerHandle) -> None:
        """A worker over its memory limit from the start is a configuration error."""
        limit = self._config.max_memory
        if limit is None:
            return
        rss = worker.sample_rss()
        if rss is not None and rss > limit:
            self._policies[worker].exempt_from_memory = True
            self._log.error(
                "worker.over_memory_limit_when_fresh",
                worker_id=worker.id,
                pid=worker.pid,
                rss=rss,
                max_memory=limit,
                hint="raise max_memory: recycling cannot bring this worker under it",
            )

    # --- capacity and exits --------------------------------------------------------

    def capacity_changed(self, worker: WorkerHandle) -> None:
        """A worker's capacity changed (a call settled, a slot was given back...)."""
        if self._max_requests is not None:
            limit = self._policies[worker].after_calls if worker in self._policies else None
            if limit is not None and worker.calls_served >= limit and worker.state.accepting:
                self.recycle(worker, f"served {worker.calls_served} calls (max_requests)")
        if (
            worker.state is WorkerState.DRAINING
            and not worker.inflight
            and not worker.closing
            and self._lifecycle.state is PoolState.OPEN
        ):
            cfg = self._config
            self.spawn_task(worker.shutdown(cfg.shutdown_grace, cfg.kill_grace), "recycle")
        self.dispatcher.serve(worker)

    def _worker_exited(self, worker: WorkerHandle) -> None:
        self._remove(worker)
        why = (
            worker.kill_reason
            or worker.recycle_reason
            or f"its worker {worker.id} died ({describe_exit(worker.exit_code)})"
        )
        is_open = self._lifecycle.state is PoolState.OPEN
        hook = self._config.on_session_lost
        for session in self._sessions.worker_left(worker, why):
            if not is_open:
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
        if is_open:
            self.evictions.worker_left(worker)
            if worker.recycle_reason is None:
                self._recent_deaths.append(time.monotonic())
                self._wake_up()
        self.dispatcher.serve()

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

            self.spawn_task(finish(), "hook")

    # --- recycling ---------------------------------------------------------------------

    def recycle(self, worker: WorkerHandle, reason: str, hard: bool = False) -> None:
        """Make before break: start a replacement, drain this one, then stop it."""
        if not worker.state.accepting or self._lifecycle.state is not PoolState.OPEN:
            return
        policy = self._policies[worker]
        if worker.sessions and not hard:
            if policy.pending is None:
                policy.pending = reason
                self._log.info(
                    "worker.recycle_waits_for_sessions", worker_id=worker.id, pid=worker.pid
                )
            return
        if worker.leased:
            policy.pending = reason  # after the checkout ends
            return
        policy.pending = None
        worker.drain(reason)
        self.recycles += 1
        self._wake_up()
        self.capacity_changed(worker)

    def session_ended(self, worker: WorkerHandle) -> None:
        """A session of ``worker`` ended: a recycle that waited for it may go ahead."""
        pending = self.recycle_pending(worker)
        if pending is not None and not worker.sessions:
            self.recycle(worker, pending)

    def _check_recycling(self, now: float) -> None:
        cfg = self._config
        for worker in list(self.workers):
            if not worker.state.accepting:
                continue
            policy = self._policies[worker]
            if policy.pending is not None and not worker.sessions and not worker.leased:
                self.recycle(worker, policy.pending)
                continue
            if (
                cfg.max_lifetime is not None
                and worker.ready_at is not None
                and now - worker.ready_at > cfg.max_lifetime
            ):
                self.recycle(worker, f"older than max_lifetime={cfg.max_lifetime}s")
                continue
            if cfg.max_memory is None and cfg.max_memory_hard is None:
                continue
            rss = worker.sample_rss()
            if rss is None or policy.exempt_from_memory:
                continue
            if cfg.max_memory_hard is not None and rss > cfg.max_memory_hard:
                self.recycle(worker, f"RSS {rss} bytes over max_memory_hard", hard=True)
            elif cfg.max_memory is not None and rss > cfg.max_memory:
                self.recycle(worker, f"RSS {rss} bytes over max_memory")

    # --- size ------------------------------------------------------------------------------

    def _callers_waiting(self) -> None:
        if self.size < self._config.largest:
            self._wake_up()  # callers wait: the pool may grow

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _maybe_grow(self, now: float) -> float | None:
        """Add a worker while callers wait, rate-limited; returns when to look again."""
        cfg = self._config
        if not len(self.dispatcher.queues) or self.size >= cfg.largest:
            return None
        if any(w.state is WorkerState.STARTING for w in self.workers):
            return None  # one start at a time; the next look comes when it is ready
        allowed_at = self._last_grow + 1.0 / cfg.max_spawn_rate
        if now < allowed_at:
            return allowed_at
        self.size += 1
        self._last_grow = now
        self._log.info("pool.growing", size=self.size, waiting=len(self.dispatcher.queues))
        return None

    def _retire_idle(self, now: float) -> None:
        """Stop workers idle past idle_timeout while the pool is above min_size."""
        cfg = self._config
        for worker in list(self.workers):
            if self.size <= cfg.smallest:
                return
            if (
                worker.state is WorkerState.READY
                and not worker.sessions
                and not worker.claimed
                and now - worker.idle_since > cfg.idle_timeout
            ):
                self.size -= 1
                worker.drain(f"idle for {now - worker.idle_since:.1f}s (idle_timeout)")
                self.capacity_changed(worker)

    def _backoff(self) -> float:
        """Seconds to wait before the next start: grows while starts fail or deaths come fast."""
        cfg = self._config
        now = time.monotonic()
        while self._recent_deaths and self._recent_deaths[0] < now - 1.0:
            self._recent_deaths.popleft()
        exponent = self._consecutive_failures
        if len(self._recent_deaths) > self.size:  # a crash storm: slow down replacements
            exponent = max(exponent, len(self._recent_deaths) - self.size)
        if exponent == 0:
            return 0.0
        return float(min(cfg.restart_backoff_max, cfg.restart_backoff * 2 ** (exponent - 1)))

    # --- the loop ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep `size` workers, replace the dead with backoff, and send heartbeats."""
        try:
            await self._supervise_forever()
        except asyncio.CancelledError:
            if self._lifecycle.state is PoolState.OPEN:
                # Cancelled from outside while open: the event loop is being torn
                # down (asyncio.run ending) and aclose() was never called. Kill
                # every worker now, since nothing will run after this.
                warnings.warn(
                    f"pool {self._name} ({self._app_target!r}) was never closed; its workers were "
                    "killed as the event loop shut down. Use `async with Pool(...)` or "
                    "`await pool.aclose()`.",
                    ResourceWarning,
                    stacklevel=1,
                )
                self._lifecycle.move(PoolState.CLOSED)
                for worker in self.workers:
                    worker.abandon()
                self._launcher.abandon()
            raise

    async def _supervise_forever(self) -> None:
        assert self._wake is not None
        wake = self._wake
        cfg = self._config
        next_beat = time.monotonic() + cfg.heartbeat_interval
        while self._lifecycle.state is PoolState.OPEN:
            now = time.monotonic()
            next_grow = self._maybe_grow(now)
            missing = self.size - self.serving_count()
            if missing > 0:
                delay = self._backoff()
                if delay:
                    await asyncio.sleep(delay)
                    if self._lifecycle.state is not PoolState.OPEN:
                        return
                    missing = self.size - self.serving_count()
                for _ in range(max(0, missing)):
                    self.restarts += 1
                    self.spawn_task(self._replace(self._new_worker()), "start")
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

    def _heartbeat(self, now: float) -> None:
        timeout = self._config.heartbeat_timeout
        for worker in list(self.workers):
            if not worker.state.accepting:
                continue
            silent = worker.silent_for(now)
            if silent > timeout:
                worker.kill(f"missed heartbeats: no answer to a ping for {silent:.1f}s (hung?)")
            else:
                worker.ping()

    def _expire_sessions(self, now: float) -> None:
        ttl = self._config.session_ttl
        if ttl is None:
            return
        for session in self._sessions.expired(now, ttl):
            home = self._sessions.get(session)
            self._log.info(
                "session.expired",
                session=session,
                idle_seconds=ttl,
                worker_id=None if home is None else home.id,
                pid=None if home is None else home.pid,
            )
            self.end_session(session)

    def end_session(self, session: str) -> None:
        """End a session (closed by its owner or expired) and let its worker's recycle go."""
        worker = self._sessions.end(session)
        if worker is not None:
            self.session_ended(worker)
            self.dispatcher.serve()
