"""The pool's invariants under random sequences of operations, with real workers.

Hypothesis has no async stateful testing, so the machine drives one persistent
event loop (``asyncio.Runner``) across rules: the pool's own tasks live on
between steps, as they do in an application.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import psutil
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import corral
from corral import Pool
from corral._state import WorkerState

TARGET = "tests.workers.basic:app"
SIZE = 2
SESSIONS = ("alice", "bob", "carol")
_values = itertools.count()


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie; a process that exits while we look is not running."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.pool = Pool(
            TARGET,
            size=SIZE,
            max_concurrency=2,
            cancel_grace=0.3,
            max_message_size=64 * 1024,
            restart_backoff=0.01,
            heartbeat_interval=0.05,
            heartbeat_timeout=0.5,
        )
        self.runner.run(self.pool.start())
        self.background: list[tuple[asyncio.Future[object], int]] = []
        self.session_values: dict[str, object] = {}
        self.closed = False
        self.evicted_pids: set[int] = set()

    def run(self, coro: object) -> object:
        return self.runner.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]

    # --- rules -------------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule()
    def call_ok(self) -> None:
        value = next(_values)
        assert self.run(self.pool.call("echo", value)) == value

    @precondition(lambda self: not self.closed)
    @rule()
    def call_raises(self) -> None:
        with pytest.raises(corral.RemoteError):
            self.run(self.pool.call("fail", "boom"))

    @precondition(lambda self: not self.closed)
    @rule()
    def call_crashes(self) -> None:
        with pytest.raises(corral.WorkerCrashed) as info:
            self.run(self.pool.call("exit_now", 3))
        if info.value.pid is not None:
            self.evicted_pids.add(info.value.pid)
        self.session_values.clear()  # any session may have lived there

    @precondition(lambda self: not self.closed)
    @rule()
    def call_writes_garbage(self) -> None:
        with pytest.raises(corral.ProtocolError) as info:
            self.run(self.pool.call("write_garbage_to_wire"))
        if info.value.pid is not None:
            self.evicted_pids.add(info.value.pid)
        self.session_values.clear()

    @precondition(lambda self: not self.closed)
    @rule()
    def call_hangs_holding_the_gil(self) -> None:
        with pytest.raises(corral.WorkerCrashed, match="missed heartbeats") as info:
            self.run(self.pool.call("hold_the_gil"))
        if info.value.pid is not None:
            self.evicted_pids.add(info.value.pid)
        self.session_values.clear()

    @precondition(lambda self: not self.closed)
    @rule()
    def call_oversize(self) -> None:
        with pytest.raises(corral.PayloadTooLarge):
            self.run(self.pool.call("echo", b"x" * 100_000))

    @precondition(lambda self: not self.closed)
    @rule()
    def call_times_out(self) -> None:
        with pytest.raises(corral.CallTimeout):
            self.run(self.pool.call("async_sleep", 5, timeout=0.05))

    @precondition(lambda self: not self.closed)
    @rule(session=st.sampled_from(SESSIONS))
    def session_round_trip(self, session: str) -> None:
        value = next(_values)
        try:
            self.run(self.pool.call("remember", "k", value, session=session))
        except corral.SessionLost:
            return
        try:
            got = self.run(self.pool.call("recall", "k", session=session))
        except corral.SessionLost:
            return
        assert got == value
        self.session_values[session] = value

    @precondition(lambda self: not self.closed)
    @rule(session=st.sampled_from(SESSIONS))
    def close_session(self, session: str) -> None:
        self.run(self.pool.close_session(session))
        self.session_values.pop(session, None)

    @precondition(lambda self: not self.closed and len(self.background) < 6)
    @rule(seconds=st.sampled_from([0.0, 0.05, 0.2]))
    def start_background_call(self, seconds: float) -> None:
        value = next(_values)

        async def start() -> asyncio.Future[object]:
            return asyncio.ensure_future(self.pool.call("async_echo_after", value, seconds))

        future = self.runner.run(start())
        self.background.append((future, value))  # type: ignore[arg-type]

    @precondition(lambda self: self.background)
    @rule(data=st.data())
    def cancel_background_call(self, data: st.DataObject) -> None:
        future, _ = data.draw(st.sampled_from(self.background))

        async def cancel() -> None:
            future.cancel()
            await asyncio.sleep(0)

        self.runner.run(cancel())

    @precondition(lambda self: not self.closed)
    @rule()
    def raise_inside_checkout(self) -> None:
        async def body() -> None:
            async with self.pool.checkout(timeout=10):
                raise KeyError("application error")

        with pytest.raises(KeyError):
            self.run(body())

    @precondition(lambda self: not self.closed)
    @rule()
    def cancel_checkout_mid_call(self) -> None:
        async def body() -> None:
            entered = asyncio.Event()

            async def hold() -> None:
                async with self.pool.checkout(timeout=10) as worker:
                    entered.set()
                    await worker.call("cooperative_wait", 10)

            task = asyncio.ensure_future(hold())
            await entered.wait()
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        self.run(body())

    @precondition(lambda self: not self.closed)
    @rule(index=st.integers(0, SIZE - 1))
    def kill_a_worker(self, index: int) -> None:
        # Draw an index, not a worker: which workers are live depends on timing,
        # and hypothesis needs the same draws when it replays an example.
        live = [w for w in self.pool.workers if w.pid is not None and w.state.accepting]
        if not live:
            return
        worker = live[index % len(live)]
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        self.evicted_pids.add(worker.pid)
        self.session_values.clear()
        self.run(self.pool._wait_until(lambda: worker.state is WorkerState.DEAD, 5))

    @precondition(lambda self: not self.closed)
    @rule()
    def wait_until_ready(self) -> None:
        self.run(self.pool.wait_ready(timeout=10))

    @precondition(lambda self: not self.closed)
    @rule()
    def close_the_pool(self) -> None:
        self.run(self.pool.aclose())
        self.closed = True
        with pytest.raises(corral.PoolClosed):
            self.run(self.pool.call("add", 1, 1))

    @precondition(lambda self: self.closed)
    @rule()
    def nothing_succeeds_after_close(self) -> None:
        with pytest.raises(corral.PoolClosed):
            self.run(self.pool.call("echo", 1))
        self.run(self.pool.aclose())  # idempotent

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def counts_add_up(self) -> None:
        stats = self.pool.stats()
        workers = self.pool.workers
        assert stats.live == len(workers)
        assert stats.inflight == sum(w.inflight for w in workers) >= 0
        for worker in workers:
            assert worker.inflight >= 0 and worker.reserved >= 0
            assert worker.inflight <= worker.max_concurrency or worker.leased
        if self.closed:
            assert stats.closed and workers == ()

    @invariant()
    def sessions_point_only_at_live_workers(self) -> None:
        workers = set(self.pool.workers)
        for session, worker in self.pool._sessions.items():
            assert worker in workers and session in worker.sessions
        for worker in workers:
            for session in worker.sessions:
                assert self.pool._sessions.get(session) is worker

    @invariant()
    def an_evicted_worker_never_comes_back(self) -> None:
        for worker in self.pool.workers:
            if worker.state.accepting:
                assert worker.pid not in self.evicted_pids

    @invariant()
    def no_one_waits_while_a_worker_is_free(self) -> None:
        stats = self.pool.stats()
        if stats.waiting:
            assert not any(
                w.state is WorkerState.READY and not w.claimed and not w.leased
                for w in self.pool.workers
            )

    @invariant()
    def the_os_agrees_with_the_pool(self) -> None:
        children = {c.pid for c in psutil.Process().children() if _running(c)}
        launched = {w._launched.pid for w in self.pool.workers if w._launched is not None}
        spawning = sum(w._launched is None for w in self.pool.workers)  # pid not known yet
        unknown = children - launched
        assert len(unknown) <= spawning, (children, launched)  # no process the pool forgot
        for worker in self.pool.workers:
            if worker.state.accepting and worker._launched is not None:
                assert worker._launched.pid in children  # every serving worker is real

    def teardown(self) -> None:
        try:
            self.run(self.pool.aclose())
            for future, value in self.background:
                assert future.done()  # every call resolved exactly once
                if not future.cancelled() and future.exception() is None:
                    assert future.result() == value  # no cross-talk
                elif not future.cancelled():
                    assert isinstance(future.exception(), corral.CorralError)
            children = psutil.Process().children(recursive=True)
            assert not [c for c in children if _running(c)], children
        finally:
            self.runner.close()


PoolMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = pytest.mark.timeout(300)(PoolMachine.TestCase)
