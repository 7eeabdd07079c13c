"""Workers placed by a real (local) Ray: the corral API through RayLauncher, and its failures.

One local Ray instance serves every test here (fake GPUs: Ray counts
them, nothing uses them). Ray starts and stops processes of its own while
tests run, so the suite's per-test process check is replaced here by a check
by pid: no corral worker or shepherd survives a test, and every process that
``ray.init`` and the tests started is gone after ``ray.shutdown()``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

from tests._processes import assert_no_corral_process_left, reaping_what_starts  # noqa: E402

import corral  # noqa: E402
from corral import Pool  # noqa: E402
from corral.ray import RayLauncher  # noqa: E402

TARGET = "tests.workers.basic:app"
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.allow_leaks  # checked by pid below, not by the suite's check


def _temp_dir() -> str:
    """Ray's session folder: inside this folder, unless that path is too long.

    Ray puts Unix sockets in it, whose paths must fit in 107 bytes; Ray adds
    about 65 to the folder's path.
    """
    inside = HERE / ".ray"
    if len(str(inside)) <= 40:
        return str(inside)
    return tempfile.mkdtemp(prefix="cr")


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """The one local Ray of the test run (every Ray test is in this module).

    Module-scoped, so that Ray is gone before the rest of the suite runs: its
    processes come and go on their own, which the per-test leak check of the
    other modules would take for leaks.
    """
    temp_dir = _temp_dir()
    try:
        with reaping_what_starts(ray.shutdown, "ray.shutdown()"):
            ray.init(
                address="local",
                num_cpus=2,
                num_gpus=2,  # fake: Ray only counts them
                _temp_dir=temp_dir,
                include_dashboard=False,
                log_to_driver=False,
            )
            yield
    finally:
        if not temp_dir.startswith(str(HERE)):
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_corral_process_left(ray_instance: None) -> Iterator[None]:
    yield
    assert_no_corral_process_left()


def launcher(**options: object) -> RayLauncher:
    """Listening on loopback: the local Ray instance is on this host."""
    return RayLauncher(host="127.0.0.1", **{"num_cpus": 0.5, "start_timeout": 120, **options})


@pytest.mark.timeout(240)
async def test_the_api_examples_work_through_ray_workers() -> None:
    async with Pool(TARGET, size=2, launcher=launcher(num_gpus=1)) as pool:
        assert await pool.call("add", 1, 2) == 3
        assert await pool.call("add", 1, 2, timeout=5.0) == 3
        assert await pool.call("math.mul", 6, 7) == 42
        await pool.call("remember", "k", 1, session="user-42")
        assert await pool.call("recall", "k", session="user-42") == 1
        assert [x async for x in pool.stream("count", 5)] == [0, 1, 2, 3, 4]
        async with pool.checkout(session="user-42", timeout=1.0) as worker:
            assert await worker.call("add", 1, 2) == 3
            assert worker.pid == await worker.call("pid")
        await pool.close_session("user-42")
        assert await pool.call("recall", "k", session="user-42") is None
        with pytest.raises(corral.RemoteError, match="boom"):
            await pool.call("fail", "boom")
        # Each worker got the GPU Ray gave its actor, and only that one.
        async with pool.checkout() as first, pool.checkout() as second:
            devices = {
                (await w.call("environ", ["CUDA_VISIBLE_DEVICES"]))["CUDA_VISIBLE_DEVICES"]
                for w in (first, second)
            }
        assert devices == {"0", "1"}, devices
        assert pool.stats().ready == 2


@pytest.mark.timeout(240)
async def test_a_worker_killed_mid_call_is_a_crash_and_is_replaced() -> None:
    async with Pool(TARGET, size=1, launcher=launcher()) as pool:
        pid = await pool.call("pid")
        call = asyncio.ensure_future(pool.call("noisy_then_sleep", "last words", 60))
        assert await pool._wait_until(lambda: "last words" in pool.workers[0].stderr_tail, 30)
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(corral.WorkerCrashed) as info:
            await call
        detected = time.monotonic() - started
        assert info.value.exit_code == -signal.SIGKILL
        assert "last words" in (info.value.stderr_tail or "")
        print(f"crash reported after {detected * 1000:.1f} ms")
        await pool.wait_ready(timeout=120)
        assert await pool.call("pid") != pid


@pytest.mark.timeout(240)
async def test_a_killed_actor_loses_its_worker_and_a_replacement_starts() -> None:
    async with Pool(TARGET, size=1, launcher=launcher()) as pool:
        worker = psutil.Process(await pool.call("pid"))
        call = asyncio.ensure_future(pool.call("sleep", 60, session="s"))
        assert await pool._wait_until(lambda: pool.stats().inflight == 1, 30)
        ray.kill(pool.workers[0]._launched.placement._actor)
        with pytest.raises(corral.SessionLost):
            await call
        worker.wait(10)  # the shepherd's lifeline closed with the actor
        await pool.wait_ready(timeout=120)
        assert await pool.call("add", 2, 2) == 4


@pytest.mark.timeout(120)
async def test_a_request_ray_cannot_satisfy_fails_within_start_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(corral.WorkerStartError) as info:
        async with Pool(TARGET, size=1, launcher=launcher(num_gpus=3, start_timeout=3)):
            pass
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "num_gpus=3" in message and "start_timeout=3" in message, message
    assert "GPU: 2" in message, message  # what the cluster has
    assert elapsed < 60, elapsed
    # The pending actor was killed: its GPUs were never taken, a pool that fits starts.
    async with Pool(TARGET, size=1, launcher=launcher(num_gpus=2)) as pool:
        assert await pool.call("add", 1, 1) == 2


@pytest.mark.timeout(240)
async def test_the_runtime_env_reaches_the_worker() -> None:
    options = launcher(runtime_env={"env_vars": {"CORRAL_RAY_PROBE": "from-runtime-env"}})
    async with Pool(TARGET, size=1, launcher=options, env={"CORRAL_POOL_ENV": "from-pool"}) as pool:
        env = await pool.call("environ", ["CORRAL_RAY_PROBE", "CORRAL_POOL_ENV"])
        assert env == {"CORRAL_RAY_PROBE": "from-runtime-env", "CORRAL_POOL_ENV": "from-pool"}


def test_options_that_would_let_an_actor_outlive_its_pool_are_refused() -> None:
    with pytest.raises(ValueError, match="max_restarts"):
        RayLauncher(actor_options={"max_restarts": 3})
    with pytest.raises(ValueError, match="lifetime"):
        RayLauncher(actor_options={"lifetime": "detached"})


@pytest.mark.timeout(240)
async def test_workers_go_into_a_placement_group() -> None:
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 0.5, "GPU": 1}] * 2, strategy="PACK")
    try:
        await asyncio.wait_for(group.ready(), 120)
        options = launcher(num_gpus=1, placement_group=group)
        assert options.options["scheduling_strategy"].placement_group == group
        async with Pool(TARGET, size=2, launcher=options) as pool:
            async with pool.checkout() as first, pool.checkout() as second:
                devices = {
                    (await w.call("environ", ["CUDA_VISIBLE_DEVICES"]))["CUDA_VISIBLE_DEVICES"]
                    for w in (first, second)
                }
            assert len(devices) == 2, devices
    finally:
        remove_placement_group(group)


NOT_INITIALIZED = """
import asyncio
import corral
from corral.ray import RayLauncher

async def main():
    try:
        async with corral.Pool("tests.workers.basic:app", size=1, launcher=RayLauncher()):
            pass
    except corral.WorkerStartError as exc:
        print("refused:", exc)

asyncio.run(main())
"""


def test_without_ray_init_the_pool_says_to_call_it() -> None:
    run = subprocess.run(
        [sys.executable, "-c", NOT_INITIALIZED],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "refused:" in run.stdout and "ray.init(" in run.stdout, run.stdout + run.stderr
