"""Chaos: many callers against a pool whose workers are SIGKILLed at random.

For a fixed time, plain calls, session calls and streams run against a pool of
3 workers while a killer SIGKILLs a random live worker every ~0.3 s. Every
call must end, within its deadline plus a grace, with its own answer or a typed
corral error (WorkerCrashed, SessionLost, CallTimeout: a few callers always
ask for less time than their handler takes, so cancels race the kills too). Afterwards the pool is
back at full size, idle, and its counters match what the callers saw.

``pytest -s`` shows the figures (calls, kills, errors by type, worst detection
latency: from ``os.kill`` to the WorkerCrashed of a call that was in flight on
the killed worker).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import signal
import time
from dataclasses import dataclass, field

import corral
from corral import Pool

TARGET = "tests.reliability.workers:app"
SIZE = 3
DURATION = 4.0  # seconds of chaos
KILL_EVERY = 0.3  # seconds between kills (on average)
CALL_TIMEOUT = 3.0  # corral deadline of every call and stream
GRACE = 5.0  # beyond the deadline, a call that has not ended is HUNG
PLAIN_CALLERS = 12
SESSION_CALLERS = 6
STREAM_CALLERS = 4
TIMEOUT_CALLERS = 2  # calls that outlive their deadline: CallTimeout, Cancel, CancelAck
STREAM_ITEMS = 5
ALLOWED = (corral.WorkerCrashed, corral.CallTimeout)  # SessionLost is a WorkerCrashed
UNKNOWN = object()  # a session value we cannot know (the call that set it timed out)


@dataclass
class Figures:
    ok: int = 0
    calls: int = 0
    hung: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)  # untyped errors, wrong types
    wrong: list[str] = field(default_factory=list)  # an answer that is not the caller's
    kills: dict[int, float] = field(default_factory=dict)  # pid -> time of os.kill
    latencies: list[float] = field(default_factory=list)


class Chaos:
    def __init__(self, pool: Pool, seed: int) -> None:
        self.pool = pool
        self.rng = random.Random(seed)
        self.values = itertools.count()
        self.fig = Figures()
        self.stop_at = 0.0

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    async def attempt(self, what: str, coro) -> tuple[bool, object]:
        """Run one call, bounded; classify how it ended. (True, value) on success."""
        fig = self.fig
        fig.calls += 1
        started = time.monotonic()
        try:
            value = await asyncio.wait_for(coro, CALL_TIMEOUT + GRACE)
        except corral.CorralError as exc:
            fig.errors[type(exc).__name__] += 1
            if not isinstance(exc, ALLOWED):
                fig.unexpected.append(f"{what}: {exc!r}")
            elif isinstance(exc, corral.WorkerCrashed):
                killed_at = fig.kills.get(exc.pid)  # type: ignore[arg-type]
                if killed_at is not None and started < killed_at:
                    fig.latencies.append(time.monotonic() - killed_at)
            return False, exc
        except TimeoutError:  # from wait_for: CallTimeout was caught above
            fig.hung += 1
            return False, None
        except Exception as exc:  # noqa: BLE001 - anything untyped is a failure of the test
            fig.unexpected.append(f"{what}: {exc!r}")
            return False, exc
        fig.ok += 1
        return True, value

    async def plain_caller(self) -> None:
        while self.running():
            value = next(self.values)
            ok, got = await self.attempt(
                "call",
                self.pool.call("async_echo_after", value, 0.01, timeout=CALL_TIMEOUT),
            )
            if ok and got != value:
                self.fig.wrong.append(f"call echo {value!r} -> {got!r}")

    async def timeout_caller(self) -> None:
        while self.running():
            value = next(self.values)
            ok, got = await self.attempt(
                "call past its deadline",
                self.pool.call("async_echo_after", value, 0.1, timeout=0.03),
            )
            if ok and got != value:
                self.fig.wrong.append(f"call echo {value!r} -> {got!r}")

    async def session_caller(self, n: int) -> None:
        session = f"chaos-{n}"
        expected: object = None  # what recall() must return; None: a fresh session
        while self.running():
            value = next(self.values)
            ok, got = await self.attempt(
                "session remember",
                self.pool.call(
                    "remember", "k", value, 0.005, session=session, timeout=CALL_TIMEOUT
                ),
            )
            if ok:
                expected = value
                if got != value:
                    self.fig.wrong.append(f"remember {value!r} -> {got!r}")
            else:
                expected = None if isinstance(got, corral.SessionLost) else UNKNOWN
                self._check_session_error(got)
                continue
            ok, got = await self.attempt(
                "session recall",
                self.pool.call("recall", "k", 0.005, session=session, timeout=CALL_TIMEOUT),
            )
            if ok:
                if expected is not UNKNOWN and got != expected:
                    self.fig.wrong.append(f"session {session}: recall -> {got!r}, not {expected!r}")
            else:
                self._check_session_error(got)

    def _check_session_error(self, exc: object) -> None:
        if isinstance(exc, corral.WorkerCrashed) and not isinstance(exc, corral.SessionLost):
            self.fig.unexpected.append(f"session call got WorkerCrashed, not SessionLost: {exc!r}")

    async def stream_caller(self) -> None:
        while self.running():
            value = next(self.values)
            items: list[object] = []

            async def consume(value=value, items=items) -> list[object]:
                async for item in self.pool.stream(
                    "echo_stream", value, STREAM_ITEMS, 0.005, timeout=CALL_TIMEOUT
                ):
                    items.append(item)
                return items

            ok, _ = await self.attempt("stream", consume())
            want = [[value, i] for i in range(STREAM_ITEMS)]
            if (ok and items != want) or items != want[: len(items)]:
                self.fig.wrong.append(f"stream {value!r} -> {items!r}")

    async def killer(self) -> None:
        fig = self.fig
        while self.running():
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * KILL_EVERY)  # pacing, not sync
            live = [
                w
                for w in self.pool.workers
                if w.state.accepting and w.pid is not None and w.pid not in fig.kills
            ]
            if not live or not self.running():
                continue
            victim = self.rng.choice(live)
            assert victim.pid is not None
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            fig.kills[victim.pid] = time.monotonic()


async def test_random_sigkills_under_load_hang_nothing_and_lose_nothing() -> None:
    seed = int(os.environ.get("CORRAL_CHAOS_SEED", time.time_ns() % 1_000_000))
    async with Pool(TARGET, size=SIZE, cancel_grace=2.0) as pool:
        await pool.wait_ready(timeout=15)
        chaos = Chaos(pool, seed)
        fig = chaos.fig
        chaos.stop_at = time.monotonic() + DURATION
        callers = [
            *(chaos.plain_caller() for _ in range(PLAIN_CALLERS)),
            *(chaos.session_caller(n) for n in range(SESSION_CALLERS)),
            *(chaos.stream_caller() for _ in range(STREAM_CALLERS)),
            *(chaos.timeout_caller() for _ in range(TIMEOUT_CALLERS)),
            chaos.killer(),
        ]
        # Each call is bounded by CALL_TIMEOUT + GRACE; the whole run by one more bound.
        await asyncio.wait_for(asyncio.gather(*callers), DURATION + 2 * (CALL_TIMEOUT + GRACE))

        await pool.wait_ready(timeout=15)
        await pool.wait_idle(timeout=10)
        assert await pool.call("add", 1, 2, timeout=5) == 3
        stats = pool.stats()
        pids = {w.pid for w in pool.workers}

        worst = max(fig.latencies, default=0.0)
        median = sorted(fig.latencies)[len(fig.latencies) // 2] if fig.latencies else 0.0
        print(
            f"\nchaos (seed {seed}): {DURATION:.0f}s, {SIZE} workers, "
            f"callers: {PLAIN_CALLERS} plain, {SESSION_CALLERS} session, {STREAM_CALLERS} "
            f"stream, {TIMEOUT_CALLERS} timing out\n"
            f"  calls {fig.calls}: ok {fig.ok}, errors {sum(fig.errors.values())} "
            f"{dict(sorted(fig.errors.items()))}, hung {fig.hung}, wrong {len(fig.wrong)}, "
            f"untyped/unexpected {len(fig.unexpected)}\n"
            f"  kills {len(fig.kills)}, restarts {stats.restarts}, "
            f"failed starts {stats.failed_starts}\n"
            f"  detection latency (os.kill -> WorkerCrashed, {len(fig.latencies)} calls in "
            f"flight): median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms\n"
            f"  pool counters: calls_ok {stats.calls_ok}, calls_failed {stats.calls_failed}"
        )

        assert fig.hung == 0
        assert fig.wrong == []
        assert fig.unexpected == []
        assert fig.calls == fig.ok + sum(fig.errors.values())
        assert len(fig.kills) >= 5, "the killer barely ran"
        assert fig.errors["WorkerCrashed"] + fig.errors["SessionLost"] > 0, "no kill was felt"
        assert fig.errors["CallTimeout"] > 0, "no call timed out"
        assert fig.ok > 10 * len(fig.kills), "the pool barely served anything"
        assert fig.latencies, "no call in flight on a killed worker was measured"
        assert worst < 2.0, f"a crash took {worst:.2f}s to be reported"
        # The pool is back at full size, with none of the killed workers.
        assert stats.ready == SIZE and stats.live == SIZE, stats
        assert not pids & set(fig.kills)
        assert stats.inflight == 0 and stats.waiting == 0 and stats.leased == 0, stats
        assert not stats.failed and not stats.closed
        # Every kill was replaced, and nothing else was.
        assert stats.restarts == len(fig.kills) + stats.failed_starts, stats
        # The pool counted exactly the successes the callers saw (+1: the final add),
        # and never more failures of a type than the callers saw. (It can count fewer:
        # see test_stats_count_every_failed_call.)
        assert stats.calls_ok == fig.ok + 1, (stats.calls_ok, fig.ok)
        for name, count in stats.calls_failed.items():
            assert count <= fig.errors[name], (stats.calls_failed, fig.errors)


async def test_stats_count_every_failed_call() -> None:
    seen: collections.Counter[str] = collections.Counter()
    async with Pool(TARGET, size=1, max_concurrency=1) as pool:
        # SessionLost told to the next call of a session whose worker died idle.
        await pool.call("remember", "k", 1, session="s")
        pid = await pool.call("pid")
        os.kill(pid, signal.SIGKILL)
        assert await pool._wait_until(lambda: pid not in {w.pid for w in pool.workers}, 5)
        try:
            await pool.call("recall", "k", session="s")
        except corral.SessionLost as exc:
            seen[type(exc).__name__] += 1
        await pool.wait_ready(timeout=10)
        # CallTimeout while waiting in the queue for a worker.
        async with pool.checkout():
            try:
                await pool.call("add", 1, 1, timeout=0.05)
            except corral.CallTimeout as exc:
                seen[type(exc).__name__] += 1
        assert seen == {"SessionLost": 1, "CallTimeout": 1}
        assert pool.stats().calls_failed == dict(seen)
