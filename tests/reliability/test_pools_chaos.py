"""Chaos behind the Pools front: one workload, two pools, the first one abused.

Workload ``w`` is served by ``primary`` (2 workers, ``max_waiting=0``: it
sheds to the fallback rather than queue for a replacement) with ``backup``
(2 workers) as its fallback. Callers keep calling it, some marked idempotent,
some not, each call with a deadline. Meanwhile:

1. kills: a live worker of ``primary`` is SIGKILLed every ~0.15 s for
   ``KILL_SECONDS``;
2. broken: every start of a ``primary`` worker fails (a marker file its
   ``on_startup`` refuses), and its live workers are killed, so the pool
   goes failed (``PoolFailed``) and its breaker opens; it stays so for
   ``BROKEN_SECONDS``;
3. healed: the marker is removed; ``primary`` starts a worker again.

Promises checked: idempotent calls see zero failures (they fall back);
non-idempotent calls fail only with typed corral errors; no call takes longer
than its deadline (plus the event loop's scheduling slack); and once
``primary`` is ready again, its traffic comes back within one breaker
cool-down. ``pytest -s`` prints the figures (docs/reliability.md quotes them).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral import BreakerConfig, CorralError, Pool, Pools, Workload

TARGET = "tests.reliability.routed_workers:app"
DEADLINE = 5.0  # every call's timeout
SLACK = 1.0  # a loaded 2-CPU machine may run a timer this late
COOLDOWN = 1.0
KILL_SECONDS = 3.0
BROKEN_SECONDS = 2.0
IDEMPOTENT_CALLERS = 8
PLAIN_CALLERS = 4


@dataclass
class Figures:
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    served_by: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    idempotent_failures: list[str] = field(default_factory=list)
    untyped: list[str] = field(default_factory=list)
    slowest: float = 0.0
    kills: int = 0
    primary_served_at: list[float] = field(default_factory=list)


class Run:
    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.fig = Figures()
        self.stop = False
        self.rng = random.Random(7)

    async def caller(self, idempotent: bool) -> None:
        kind = "idempotent" if idempotent else "plain"
        while not self.stop:
            started = time.monotonic()
            self.fig.calls[kind] += 1
            try:
                routed = await asyncio.wait_for(
                    self.pools.call_routed(
                        "work", 0.01, workload="w", idempotent=idempotent, timeout=DEADLINE
                    ),
                    DEADLINE + SLACK + 5,
                )
            except CorralError as exc:
                self.fig.errors[f"{kind}: {type(exc).__name__}"] += 1
                if idempotent:
                    self.fig.idempotent_failures.append(repr(exc))
            except Exception as exc:  # noqa: BLE001 - counted: the test fails on any of these
                self.fig.untyped.append(f"{kind}: {exc!r}")
            else:
                self.fig.served_by[routed.pool] += 1
                if routed.pool == "primary":
                    self.fig.primary_served_at.append(time.monotonic())
            self.fig.slowest = max(self.fig.slowest, time.monotonic() - started)

    def kill_one(self, pool: Pool) -> None:
        pids = [w.pid for w in pool.status().workers if w.pid and w.state in ("ready", "busy")]
        if pids:
            try:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                return  # it died already (an earlier kill): the pool has not heard yet
            self.fig.kills += 1


async def test_idempotent_calls_fall_back_through_kills_and_failed_starts(tmp_path: Path) -> None:
    marker = tmp_path / "broken"
    primary = Pool(
        TARGET,
        size=2,
        name="primary",
        env={"CORRAL_TEST_BROKEN": str(marker)},
        max_waiting=0,  # shed to the fallback at once rather than queue for a replacement
        max_restarts=2,
        restart_backoff=0.05,
        restart_backoff_max=0.3,
    )
    backup = Pool(TARGET, size=2, name="backup")
    pools = Pools(
        primary,
        backup,
        workloads={"w": Workload(["primary", "backup"])},
        breaker=BreakerConfig(window=2.0, min_calls=5, cooldown=COOLDOWN),
    )
    run = Run(pools)
    async with pools:
        callers = [asyncio.create_task(run.caller(True)) for _ in range(IDEMPOTENT_CALLERS)] + [
            asyncio.create_task(run.caller(False)) for _ in range(PLAIN_CALLERS)
        ]
        try:
            # 1. kills
            until = time.monotonic() + KILL_SECONDS
            while time.monotonic() < until:
                run.kill_one(primary)
                await asyncio.sleep(0.15)
            # 2. every start fails
            marker.write_text("broken")
            failed_by = time.monotonic() + 30
            while not primary.stats().failed:
                assert time.monotonic() < failed_by, "primary never went failed"
                run.kill_one(primary)
                await asyncio.sleep(0.1)
            await asyncio.sleep(BROKEN_SECONDS)  # failed, breaker open: all on backup
            assert pools.stats().routes["primary"].breaker != "closed"
            # 3. healed
            marker.unlink()
            ready_by = time.monotonic() + 60
            while primary.stats().ready < 1:  # wait_ready() raises while the pool is failed
                assert time.monotonic() < ready_by, "primary never started again"
                await asyncio.sleep(0.01)
            healed = time.monotonic()
            while not [t for t in run.fig.primary_served_at if t >= healed]:
                assert time.monotonic() - healed < 30, "traffic never came back to primary"
                await asyncio.sleep(0.01)
            back_after = min(t for t in run.fig.primary_served_at if t >= healed) - healed
        finally:
            run.stop = True
            await asyncio.gather(*callers)
        stats = pools.stats()

    fig = run.fig
    route = stats.routes["primary"]
    sys.stdout.write(
        f"\ncalls: {dict(fig.calls)}, served by: {dict(fig.served_by)}, kills: {fig.kills}\n"
        f"errors: {dict(fig.errors)}\n"
        f"primary: fallbacks {route.fallbacks}, refused by its breaker {route.circuit_open}, "
        f"transitions {route.transitions}\n"
        f"slowest call {fig.slowest:.3f}s (deadline {DEADLINE}s); traffic back on primary "
        f"{back_after:.3f}s after it was ready again (cool-down {COOLDOWN}s)\n"
    )
    assert fig.idempotent_failures == []
    assert fig.untyped == []
    assert fig.slowest <= DEADLINE + SLACK
    assert back_after <= COOLDOWN + 0.5
    assert route.transitions.get("closed->open", 0) >= 1
    assert route.fallbacks > 0 and fig.served_by["backup"] > 0
    assert fig.calls["plain"] > 0 and fig.calls["idempotent"] > 0
