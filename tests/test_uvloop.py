"""corral on uvloop, the loop uvicorn picks by default."""

from __future__ import annotations

import asyncio

import pytest

import corral

uvloop = pytest.importorskip("uvloop")
# uvloop opens two descriptors of its own once per process, on first use: open
# them now, before the leak check takes its baseline.
uvloop.run(asyncio.sleep(0))


def test_the_pool_works_on_uvloop() -> None:
    async def main() -> None:
        async with corral.Pool("tests.workers.basic:app", size=2) as pool:
            assert await pool.call("add", 1, 2) == 3
            assert [x async for x in pool.stream("count", 3)] == [0, 1, 2]
            results = await asyncio.gather(*(pool.call("echo", i) for i in range(200)))
            assert results == list(range(200))
            with pytest.raises(corral.WorkerCrashed) as info:
                await pool.call("exit_now", 4)
            assert info.value.exit_code == 4
            await pool.wait_ready(timeout=10)
            with pytest.raises(corral.CallTimeout):
                await pool.call("async_sleep", 5, timeout=0.1)

    uvloop.run(main())


def test_preloaded_workers_work_on_uvloop(tmp_path) -> None:
    async def main() -> None:
        async with corral.Pool(
            "tests.workers.preloaded:app",
            size=1,
            preload=["tests.workers.slow_import"],
            env={"CORRAL_TEST_IMPORT_SECONDS": "0"},
        ) as pool:
            template = await pool.call("imported_by")
            assert template != await pool.call("pid")
            with pytest.raises(corral.WorkerCrashed) as info:
                await pool.call("exit_now", 4)
            assert info.value.exit_code == 4
            await pool.wait_ready(timeout=10)
            assert await pool.call("imported_by") == template

    uvloop.run(main())


def test_workers_over_tcp_work_on_uvloop() -> None:
    from corral._launch._socket_launcher import SubprocessShimLauncher

    async def main() -> None:
        launcher = SubprocessShimLauncher()
        async with corral.Pool("tests.workers.basic:app", size=2, launcher=launcher) as pool:
            assert await pool.call("add", 1, 2) == 3
            results = await asyncio.gather(*(pool.call("echo", i) for i in range(200)))
            assert results == list(range(200))
            with pytest.raises(corral.WorkerCrashed) as info:
                await pool.call("exit_now", 4)
            assert info.value.exit_code == 4
            await pool.wait_ready(timeout=10)
        assert launcher.listener is None

    uvloop.run(main())
