"""Workers over several Ray nodes: where each runs, and a node lost and replaced.

A simulated cluster on this machine (``ray.cluster_utils.Cluster``: a head
with no CPUs and two nodes of 2 CPUs) with fast health checks, so that Ray
declares a SIGKILLed node dead within about 2 s instead of 15. A node's loss
must not use up the restart budget: the tests run with ``max_restarts=0``,
where a single counted failure would fail the pool. Like ``test_ray.py``,
leaks are checked by pid: no corral process outlives its pool, and every
process the cluster started is gone after it shuts down. One cluster per
module (this one), so it never runs beside the local Ray of ``test_ray.py`` in
the same process.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from tests._processes import assert_no_corral_process_left, reaping_what_starts  # noqa: E402

import corral  # noqa: E402
from corral import Pool  # noqa: E402
from corral.ray import RayLauncher  # noqa: E402

TARGET = "tests.workers.basic:app"
CPUS_PER_NODE = 2

pytestmark = pytest.mark.allow_leaks  # checked by pid below, not by the suite's check


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    temp_dir = tempfile.mkdtemp(prefix="crn")  # Ray's socket paths must stay short
    made: Any = None

    def shut_down() -> None:
        ray.shutdown()
        if made is not None:
            made.shutdown()

    try:
        with reaping_what_starts(shut_down, "the cluster shut down"):
            made = cluster_utils.Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0,
                    "temp_dir": temp_dir,
                    "_system_config": {
                        "health_check_period_ms": 500,
                        "health_check_failure_threshold": 4,
                    },
                },
            )
            for _ in range(2):
                made.add_node(num_cpus=CPUS_PER_NODE)
            ray.init(address=made.address, log_to_driver=False, logging_level=logging.ERROR)
            yield made
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_corral_process_left(cluster: Any) -> Iterator[None]:
    yield
    assert_no_corral_process_left()


def _launcher(**options: Any) -> RayLauncher:
    options = {"start_timeout": 60, **options}
    return RayLauncher(host="127.0.0.1", num_cpus=1, scheduling_strategy="SPREAD", **options)


async def _all_cpus_free(cluster: Any, timeout: float) -> bool:
    """Wait (bounded) until Ray counts every CPU of the cluster's nodes free."""
    total = CPUS_PER_NODE * len(cluster.worker_nodes)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while ray.available_resources().get("CPU", 0) < total:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)  # Ray offers no event for it: poll its counters
    return True


def _ready_by_node(pool: Pool) -> dict[str, int]:
    return {n.id: n.ready for n in pool.status().nodes if n.ready}


@pytest.mark.timeout(300)
async def test_status_shows_the_ray_node_of_each_worker(cluster: Any) -> None:
    nodes = {node.node_id for node in cluster.worker_nodes}
    assert await _all_cpus_free(cluster, 60)
    async with Pool(TARGET, size=2, launcher=_launcher()) as pool:
        await pool.wait_ready(timeout=120)
        await pool.call("remember", "k", 1, session="s")
        status = pool.status()
        # SPREAD: one worker on each node, each shown with Ray's id for its node.
        assert {w.node_id for w in status.workers} == nodes
        assert all(w.node_address for w in status.workers)
        assert {n.id for n in status.nodes} == nodes
        assert [n.workers for n in status.nodes] == [1, 1]
        assert sum(n.sessions for n in status.nodes) == 1
        body = status.to_dict()
        assert {w["node_id"] for w in body["workers"]} == nodes


@pytest.mark.timeout(420)
async def test_a_lost_node_costs_no_restart_budget_and_a_new_node_refills_the_pool(
    cluster: Any,
) -> None:
    # Three workers over two 2-CPU nodes; when the busier node goes, the other
    # holds two, the third start cannot be placed until a node is added.
    # First, every CPU free again: Ray releases an earlier test's actors on its own time.
    assert await _all_cpus_free(cluster, 60)
    async with Pool(
        TARGET,
        size=3,
        launcher=_launcher(start_timeout=6),
        max_restarts=0,  # one counted failure would fail the pool
        restart_backoff=0.1,
        restart_backoff_max=1.0,
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
    ) as pool:
        await pool.wait_ready(timeout=120)
        busiest = pool.status().nodes[0]
        assert busiest.workers == 2
        doomed = next(n for n in cluster.worker_nodes if n.node_id == busiest.id)
        calls = {
            f"s{i}": asyncio.ensure_future(pool.call("async_sleep", 120, session=f"s{i}"))
            for i in range(3)
        }
        assert await pool._wait_until(lambda: pool.stats().inflight == 3, 30)
        doomed_calls = [c for s, c in calls.items() if pool._sessions[s].node_id == busiest.id]
        assert len(doomed_calls) == 2
        cluster.remove_node(doomed, allow_graceful=False)

        # The calls on the lost node fail, typed; the other node's call goes on.
        outcomes = await asyncio.wait_for(asyncio.gather(*doomed_calls, return_exceptions=True), 60)
        assert all(isinstance(o, corral.SessionLost) for o in outcomes), outcomes
        assert sum(c.done() for c in calls.values()) == 2
        assert await pool.call("add", 1, 2, timeout=60) == 3  # it keeps serving

        # Back to what the cluster holds (2), and the third start is refused by
        # placement, again and again, without failing the pool.
        survivor = next(n.node_id for n in cluster.worker_nodes if n is not doomed)
        assert await pool._wait_until(lambda: _ready_by_node(pool) == {survivor: 2}, 120)
        assert await pool._wait_until(lambda: pool.stats().placement_failures >= 1, 120)
        stats = pool.stats()
        assert pool._failed is None and not stats.failed, pool.status().evictions
        assert stats.failed_starts == stats.placement_failures

        # A new node: the pool is whole again, with a worker there.
        added = cluster.add_node(num_cpus=CPUS_PER_NODE)
        await pool.wait_ready(timeout=120)
        assert await pool._wait_until(lambda: added.node_id in _ready_by_node(pool), 60)
        assert _ready_by_node(pool) == {survivor: 2, added.node_id: 1}
        assert pool._failed is None
        for call in calls.values():
            call.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
