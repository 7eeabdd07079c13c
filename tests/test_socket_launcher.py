"""Workers that connect back over TCP through a shim: the whole corral API, and its failures.

``SubprocessShimLauncher`` runs the shim as a local process: the same listener,
handshake, shim and socket transport as the Ray launcher, without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from corral import Pool
from corral._launch import WorkerSpec
from corral._launch._shim import ShimOrder
from corral._launch._socket_launcher import Placement, SubprocessShimLauncher, _SubprocessPlacement

TARGET = "tests.workers.basic:app"
ROOT = Path(__file__).resolve().parent.parent


def _shim_of(pool: Pool, index: int = 0) -> psutil.Process:
    placement = pool.workers[index]._launched.placement  # type: ignore[union-attr]
    return psutil.Process(placement.process.pid)


async def test_the_api_examples_work_through_tcp_workers() -> None:
    launcher = SubprocessShimLauncher()
    async with Pool(TARGET, size=2, launcher=launcher) as pool:
        assert await pool.call("add", 1, 2) == 3
        assert await pool.call("add", 1, 2, timeout=5.0) == 3
        assert await pool.call("math.mul", 6, 7) == 42
        await pool.call("remember", "k", 1, session="user-42")
        assert await pool.call("recall", "k", session="user-42") == 1
        assert [x async for x in pool.stream("count", 5)] == [0, 1, 2, 3, 4]
        async with pool.checkout(session="user-42", timeout=1.0) as worker:
            assert await worker.call("recall", "k") == 1
            assert worker.pid == await worker.call("pid")
        await pool.close_session("user-42")
        assert await pool.call("recall", "k", session="user-42") is None
        with pytest.raises(corral.RemoteError, match="boom"):
            await pool.call("fail", "boom")
        with pytest.raises(corral.MethodNotFound):
            await pool.call("no_such_method")
        assert len(await pool.call("make_bytes", 8 * 2**20)) == 8 * 2**20
        stats = pool.stats()
        assert stats.ready == 2
        assert launcher.listener is not None
    # The listener goes with the last worker: nothing is left listening.
    assert launcher.listener is None


async def test_a_worker_killed_mid_call_is_a_crash_with_its_stderr_and_is_replaced() -> None:
    async with Pool(TARGET, size=1, launcher=SubprocessShimLauncher()) as pool:
        pid = await pool.call("pid")
        call = asyncio.ensure_future(pool.call("noisy_then_sleep", "last words", 30))
        assert await pool._wait_until(lambda: "last words" in pool.workers[0].stderr_tail, 5)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(corral.WorkerCrashed) as info:
            await call
        assert info.value.exit_code == -signal.SIGKILL
        assert info.value.pid == pid
        assert "last words" in (info.value.stderr_tail or "")
        await pool.wait_ready(timeout=10)
        assert await pool.call("pid") != pid


async def test_a_killed_shim_takes_its_worker_along_and_the_call_fails() -> None:
    async with Pool(TARGET, size=1, launcher=SubprocessShimLauncher()) as pool:
        worker = psutil.Process(await pool.call("pid"))
        shim = _shim_of(pool)
        call = asyncio.ensure_future(pool.call("sleep", 30, session="s"))
        assert await pool._wait_until(lambda: pool.stats().inflight == 1, 5)
        shim.kill()
        with pytest.raises(corral.SessionLost, match="lost contact"):
            await call
        # The shepherd saw its lifeline close and killed the worker's group.
        worker.wait(5)
        await pool.wait_ready(timeout=10)
        assert await pool.call("add", 2, 2) == 4


async def test_a_busy_worker_still_answers_heartbeats_and_cancels() -> None:
    async with Pool(
        TARGET,
        size=1,
        launcher=SubprocessShimLauncher(),
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
    ) as pool:
        pid = await pool.call("pid")
        # A sync handler blocks the worker's loop for longer than the heartbeat
        # timeout: the control socket's thread answers for it.
        assert await pool.call("sleep", 1.0) == 1.0
        # A cancel reaches the busy worker over the control socket; it stops early.
        with pytest.raises(corral.CallTimeout):
            await pool.call("cooperative_wait", 30, timeout=0.3)
        assert await pool.call("pid") == pid
        assert pool.stats().restarts == 0


async def test_a_partitioned_worker_is_noticed_by_heartbeats_and_replaced() -> None:
    launcher = SubprocessShimLauncher(kill_timeout=0.5)
    async with Pool(
        TARGET,
        size=1,
        launcher=launcher,
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
    ) as pool:
        worker = psutil.Process(await pool.call("pid"))
        shim = _shim_of(pool)
        call = asyncio.ensure_future(pool.call("sleep", 30))
        assert await pool._wait_until(lambda: pool.stats().inflight == 1, 5)
        # Neither the worker nor its shim answers any more, as behind a partition.
        worker.suspend()
        shim.suspend()
        with pytest.raises(corral.WorkerCrashed, match="heartbeat"):
            await call
        # The kill could not be delivered: the shim was stopped through its
        # placement, and its death took the worker along.
        shim.wait(5)
        worker.wait(5)
        await pool.wait_ready(timeout=10)
        assert await pool.call("add", 1, 1) == 2


async def test_a_target_that_cannot_load_fails_start_with_the_remote_stderr() -> None:
    with pytest.raises(corral.WorkerStartError) as info:
        async with Pool("tests.workers.bad:missing", size=1, launcher=SubprocessShimLauncher()):
            pass
    assert "cannot load" in (info.value.stderr_tail or "")


class _NeverConnects(SubprocessShimLauncher):
    """A placement that never comes up: what an unsatisfiable request looks like."""

    async def _place(self, spec: WorkerSpec, order: ShimOrder, key: bytes) -> Placement:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return _SubprocessPlacement(process, "a placement that never connects")


async def test_a_placement_that_never_connects_fails_within_start_timeout() -> None:
    launcher = _NeverConnects(start_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(corral.WorkerStartError, match=r"start_timeout=0\.5s") as info:
        async with Pool(TARGET, size=1, launcher=launcher):
            pass
    assert time.monotonic() - started < 10
    assert "never connects" in str(info.value)
    assert launcher.listener is None


class _ShimFailsAtOnce(SubprocessShimLauncher):
    async def _place(self, spec: WorkerSpec, order: ShimOrder, key: bytes) -> Placement:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.exit('no route to the pool')",
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return _SubprocessPlacement(process, "a shim that fails")


async def test_a_shim_that_ends_before_connecting_fails_start_at_once_with_its_reason() -> None:
    launcher = _ShimFailsAtOnce(start_timeout=30)
    started = time.monotonic()
    with pytest.raises(corral.WorkerStartError, match="no route to the pool"):
        async with Pool(TARGET, size=1, launcher=launcher):
            pass
    assert time.monotonic() - started < 10


PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from corral import Pool
    from corral._launch._socket_launcher import SubprocessShimLauncher

    async def main():
        launcher = SubprocessShimLauncher()
        async with Pool("tests.workers.basic:app", size=2, launcher=launcher) as pool:
            asleep = asyncio.ensure_future(pool.call("sleep", 600))
            pids = {
                "workers": [w.pid for w in pool.workers],
                "shims": [w._launched.placement.process.pid for w in pool.workers],
            }
            sys.stdout.write(json.dumps(pids) + "\\n")
            sys.stdout.flush()
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_when_the_pool_process_dies_its_tcp_workers_and_shims_go_too() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        while not line.startswith(b"{"):  # the pool's own log lines come first
            line = parent.stdout.readline()
        pids = json.loads(line)
        procs = [psutil.Process(p) for p in {*pids["workers"], *pids["shims"]}]
        parent.kill()
        parent.wait(10)
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            proc.kill()
        assert not alive, f"left running after the pool died: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


FORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    import corral
    from corral._launch._socket_launcher import SubprocessShimLauncher

    async def main():
        pool = corral.Pool(
            "tests.workers.basic:app", size=1, launcher=SubprocessShimLauncher()
        )
        await pool.start()
        pids = [pool.workers[0].pid, pool.workers[0]._launched.placement.process.pid]
        child = os.fork()
        if child == 0:
            time.sleep(60)  # outlives the parent, holding whatever it inherited
            os._exit(0)
        sys.stdout.write(json.dumps({"pids": pids, "child": child}) + "\\n")
        sys.stdout.flush()
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_a_forked_child_does_not_keep_the_pools_tcp_workers_alive() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKER],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    child = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        while not line.startswith(b"{"):
            line = parent.stdout.readline()
        info = json.loads(line)
        child = info["child"]
        procs = [psutil.Process(p) for p in info["pids"]]
        parent.kill()
        parent.wait(10)
        # The child still holds copies of the pool's sockets, pointed at /dev/null
        # by the fork handler: the shim sees the pool's connection close.
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            proc.kill()
        assert not alive, "the forked child kept the pool's workers alive"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if parent.stdout is not None:
            parent.stdout.close()


def test_corral_ray_without_ray_names_the_extra_to_install() -> None:
    # sys.modules["ray"] = None makes ``import ray`` fail, as when it is not installed.
    code = "import sys; sys.modules['ray'] = None; import corral.ray"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "pip install 'corral[ray]'" in run.stderr, run.stderr


async def test_status_says_which_node_each_placed_worker_runs_on() -> None:
    async with Pool(TARGET, size=2, launcher=SubprocessShimLauncher()) as pool:
        await pool.call("remember", "k", 1, session="s")
        status = pool.status()
        host = socket.gethostname()
        assert {(w.node_id, w.node_address) for w in status.workers} == {(host, "127.0.0.1")}
        (node,) = status.nodes
        assert (node.id, node.address, node.workers, node.ready) == (host, "127.0.0.1", 2, 2)
        assert node.sessions == 1
        body = status.to_dict()
        assert body["nodes"][0]["id"] == host
        assert all(w["node_id"] == host for w in body["workers"])
        # corral top shows a node column and a nodes table.
        rich = pytest.importorskip("rich.console")
        from corral._top import render

        console = rich.Console(record=True, width=200)
        console.print(render(json.loads(json.dumps(body))))
        screen = console.export_text()
        assert "nodes" in screen and f"{host} 127.0.0.1" in screen, screen
    # A local pool has no nodes to show.
    async with Pool(TARGET, size=1) as local:
        assert local.status().nodes == () and local.status().workers[0].node_id is None


class _TellsWhenLaunched(SubprocessShimLauncher):
    """Sets ``launched`` once a shim has connected back and started its worker."""

    def __init__(self) -> None:
        super().__init__()
        self.launched = asyncio.Event()

    async def launch(self, spec: WorkerSpec, events: Any) -> Any:
        worker = await super().launch(spec, events)
        self.launched.set()
        return worker


async def test_a_worker_lost_before_its_hello_is_a_placement_failure_not_its_own() -> None:
    from corral._handle import WorkerHandle

    launcher = _TellsWhenLaunched()
    handle = WorkerHandle(
        WorkerSpec("lost-1", "tests.workers.slow_start:app", max_message_size=2**20),
        launcher,
        max_concurrency=1,
        cancel_grace=1.0,
        on_capacity=lambda worker: None,
        on_exit=lambda worker: None,
        pool_name="test",
    )
    start = asyncio.ensure_future(handle.start(60))
    try:
        # The shim connected and started the worker, which is still loading.
        await asyncio.wait_for(launcher.launched.wait(), 30)
        assert handle._launched is not None
        psutil.Process(handle._launched.placement.process.pid).kill()  # type: ignore[attr-defined]
        with pytest.raises(corral.PlacementError) as info:
            await asyncio.wait_for(start, 30)
        assert info.value.cause == "lost"
        assert "lost during start-up" in str(info.value)
    finally:
        start.cancel()
        await handle.shutdown(1.0, 1.0)
