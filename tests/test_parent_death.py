"""The pool's process is SIGKILLed: every worker and grandchild goes with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from tests._processes import parent_program, still_running

ROOT = Path(__file__).resolve().parent.parent

PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from corral import Pool

    async def main():
        async with Pool("tests.workers.basic:app", size=3) as pool:
            grandchild = await pool.call("spawn_grandchild")
            stuck = asyncio.ensure_future(pool.call("hold_the_gil"))
            asleep = asyncio.ensure_future(pool.call("sleep", 600))
            ok = await pool._wait_until(
                lambda: any("holding the GIL" in w.stderr_tail for w in pool.workers), 10
            )
            assert ok, "the GIL-holding handler never started"
            pids = {
                "workers": [w.pid for w in pool.workers],
                "shepherds": [w._launched.pid for w in pool.workers],
                "grandchild": grandchild,
            }
            sys.stdout.write(json.dumps(pids) + "\\n")
            sys.stdout.flush()
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_parent_sigkill_leaves_nothing_behind_within_one_second() -> None:
    with parent_program(PARENT, reports='{"workers"') as (parent, pids):
        everything = [*pids["workers"], *pids["shepherds"], pids["grandchild"]]
        assert all(psutil.pid_exists(p) for p in everything)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        killed_at = time.monotonic()
        alive = still_running(everything, timeout=1.0)
        elapsed = time.monotonic() - killed_at
        assert not alive, f"still running {elapsed:.2f}s after the parent died: {alive}"


FORGETFUL = textwrap.dedent(
    """
    import asyncio, json, sys, warnings
    from corral import Pool

    async def main():
        pool = Pool("tests.workers.basic:app", size=2)
        await pool.start()
        return [w.pid for w in pool.workers] + [w._launched.pid for w in pool.workers]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pids = asyncio.run(main())
    sys.stdout.write(json.dumps({"pids": pids, "warned": [str(w.message) for w in caught]}) + "\\n")
    """
)


def test_a_pool_never_closed_is_killed_when_its_event_loop_ends() -> None:
    run = subprocess.run(
        [sys.executable, "-c", FORGETFUL], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    line = next(x for x in run.stdout.splitlines() if x.startswith('{"pids"'))
    report = json.loads(line)
    assert any("was never closed" in w for w in report["warned"])
    assert not still_running(report["pids"], timeout=2.0)
