"""Which failed starts use up the restart budget: the worker's own failures, and only those.

A start that failed because of where the worker was placed (the cluster had no
room, its node died under it, the pool's listener was flooded) is a
``PlacementError``: the pool retries it with backoff and never goes to
``PoolFailed`` for it. A start that failed in the worker's code still counts.
The launcher here is the real local launcher behind a gate that fails the
starts a test chooses, as a cluster would.
"""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import Pool
from corral._errors import counts_against_restart_budget
from corral._launch import LaunchedWorker, LocalLauncher, NothingHeld, WorkerEvents, WorkerSpec

TARGET = "tests.workers.basic:app"


class _FailingStarts(NothingHeld):
    """Lets the first start through, fails the next ``failures`` with ``error``, then serves."""

    def __init__(self, failures: int, error: type[corral.WorkerStartError]) -> None:
        self._inner = LocalLauncher()
        self._left = failures
        self._error = error
        self.launches = 0
        self.failed = 0

    async def launch(self, spec: WorkerSpec, events: WorkerEvents) -> LaunchedWorker:
        self.launches += 1
        if self.launches > 1 and self._left > 0:
            self._left -= 1
            self.failed += 1
            await asyncio.sleep(0)
            if self._error is corral.PlacementError:
                raise corral.PlacementError(
                    f"the node of worker {spec.worker_id} died under it",
                    cause="node_lost",
                    worker_id=spec.worker_id,
                )
            raise self._error(f"worker {spec.worker_id} failed in its code")
        return await self._inner.launch(spec, events)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _scrape(pool: Pool) -> dict[tuple[str, str], float]:
    """The pool's Prometheus counters: (sample name, pool label) -> value."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from corral.prometheus import PoolCollector

    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    text = generate_latest(registry).decode()
    return {
        (sample.name, sample.labels.get("pool", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_only_placement_errors_are_exempt_from_the_budget() -> None:
    assert counts_against_restart_budget(corral.WorkerStartError("bad target"))
    assert not counts_against_restart_budget(corral.PlacementError("node died", cause="node_lost"))
    assert isinstance(corral.PlacementError("x", cause="placement"), corral.WorkerStartError)


@pytest.mark.timeout(60)
async def test_placement_failures_past_the_budget_never_fail_the_pool() -> None:
    # max_restarts=1: two counted failures would fail the pool; eight placement
    # failures in a row must not, and the pool gets back to its size.
    launcher = _FailingStarts(8, corral.PlacementError)
    async with Pool(
        TARGET,
        size=2,
        launcher=launcher,
        max_restarts=1,
        restart_backoff=0.01,
        restart_backoff_max=0.05,
    ) as pool:
        assert await pool.call("add", 1, 2) == 3  # the first worker serves meanwhile
        await pool.wait_ready(timeout=30)
        stats = pool.stats()
        assert launcher.failed == 8
        assert stats.failed_starts == 8, stats
        assert stats.placement_failures == 8, stats
        assert not stats.failed
        # Operators see them apart from the worker's own failures.
        exposed = _scrape(pool)
        assert exposed[("corral_worker_failed_starts_total", pool.name)] == 8
        assert exposed[("corral_worker_placement_failures_total", pool.name)] == 8
        assert pool.status().state == "open"
        assert await pool.call("add", 2, 3) == 5


@pytest.mark.timeout(60)
async def test_the_workers_own_start_failures_still_use_up_the_budget() -> None:
    launcher = _FailingStarts(1_000, corral.WorkerStartError)
    async with Pool(
        TARGET,
        size=2,
        launcher=launcher,
        max_restarts=1,
        restart_backoff=0.01,
        restart_backoff_max=0.05,
    ) as pool:
        # The pool is failed (it logs pool.failed) while its first worker still serves.
        assert await pool._wait_until(lambda: pool._failed is not None, 30)
        assert pool.stats().placement_failures == 0
        assert await pool.call("add", 1, 2) == 3
