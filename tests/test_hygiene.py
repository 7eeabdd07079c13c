"""What a worker inherits (environment, descriptors) and what a forked child may do."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"
ROOT = Path(__file__).resolve().parent.parent


async def test_env_allowlist_keeps_other_variables_out_of_the_worker(monkeypatch) -> None:
    monkeypatch.setenv("CORRAL_TEST_SECRET", "canary-4711")
    monkeypatch.setenv("CORRAL_TEST_ALLOWED", "yes")
    async with Pool(
        TARGET, size=1, env_allowlist=["CORRAL_TEST_ALLOWED", "PATH"], env={"EXTRA": "1"}
    ) as pool:
        pid = await pool.call("pid")
        environ = Path(f"/proc/{pid}/environ").read_bytes()  # noqa: ASYNC240 - procfs, instant
        assert b"canary-4711" not in environ
        got = await pool.call("environ", ["CORRAL_TEST_SECRET", "CORRAL_TEST_ALLOWED", "EXTRA"])
        assert got == {"CORRAL_TEST_SECRET": None, "CORRAL_TEST_ALLOWED": "yes", "EXTRA": "1"}


async def test_only_stdio_and_the_protocol_pipes_are_open_in_the_worker() -> None:
    async with Pool(TARGET, size=1) as pool:
        fds = await pool.call("open_fds")
        # 0, 1 (= stderr), 2, the three protocol pipes; plus what the worker's own
        # event loop opened (epoll and its self-pipe socketpair).
        pipes = [fd for fd, target in fds.items() if target.startswith("pipe:")]
        assert set(pipes) == {1, 2, *await pool.call("wire_fds")}
        assert 0 in fds and fds[0] == "/dev/null"


async def test_a_worker_that_closes_its_wire_but_lingers_is_evicted() -> None:
    async with Pool(TARGET, size=1) as pool:
        started = time.monotonic()
        with pytest.raises(corral.WorkerCrashed, match="closed its protocol pipe"):
            await pool.call("close_the_wire_and_linger")
        assert time.monotonic() - started < 3.0


FORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    import corral

    async def main():
        pool = corral.Pool("tests.workers.basic:app", size=1)
        await pool.start()
        pids = [pool.workers[0].pid, pool.workers[0]._launched.pid]
        child = os.fork()
        if child == 0:
            try:
                await pool.call("add", 1, 1)
                os.write(1, b"child-call-succeeded\\n")
            except corral.PoolClosed as exc:
                os.write(1, ("child-refused: " + str(exc).replace("\\n", " ") + "\\n").encode())
            await pool.aclose()  # a no-op in the child
            time.sleep(60)  # outlives the parent
            os._exit(0)
        sys.stdout.write(json.dumps({"pids": pids, "child": child}) + "\\n")
        sys.stdout.flush()
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_a_forked_child_cannot_use_the_pool_nor_keep_its_workers_alive() -> None:
    import psutil

    parent = subprocess.Popen(
        [sys.executable, "-c", FORKER],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    child_pid = None
    try:
        assert parent.stdout is not None
        lines = []
        for line in parent.stdout:
            lines.append(line)
            if line.startswith('{"pids"'):
                info = json.loads(line)
                child_pid = info["child"]
            if any(x.startswith("child-") for x in lines) and child_pid is not None:
                break
        assert any(x.startswith("child-refused: ") and "forked" in x for x in lines), lines
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        procs = [psutil.Process(p) for p in info["pids"] if psutil.pid_exists(p)]
        _, alive = psutil.wait_procs(procs, timeout=2.0)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, "the forked child kept the parent's workers alive"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
        if parent.stdout:
            parent.stdout.close()


async def test_math_libraries_get_one_thread_per_worker_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    async with Pool(TARGET, size=1, env={"NUMEXPR_NUM_THREADS": "2"}) as pool:
        got = await pool.call(
            "environ", ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"]
        )
    assert got == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3", "NUMEXPR_NUM_THREADS": "2"}


async def test_worker_rlimits_are_applied_from_the_parent() -> None:
    async with Pool(TARGET, size=1, worker_rlimits={"nofile": 256, "core": 0}) as pool:
        limits = await pool.call("rlimits", ["RLIMIT_NOFILE", "RLIMIT_CORE"])
    assert limits == {"RLIMIT_NOFILE": [256, 256], "RLIMIT_CORE": [0, 0]}


def test_unknown_rlimits_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown worker_rlimits"):
        Pool(TARGET, worker_rlimits={"stack_of_pancakes": 1})
