"""No program of a ToolPool outlives its owner: the pool's process SIGKILLed, or its worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from corral.tools import ToolPool

    REPL = [sys.executable, "-i", "-q"]

    async def main():
        async with ToolPool(REPL, size=2, prompt=">>> ", mode="pty") as ptys, \\
                ToolPool(REPL, size=2, prompt=">>> ", mode="pipes", workers=2) as pipes:
            tools = [(await i.status()).pid for t in (ptys, pipes) for i in t.instances]
            workers = [w.pid for t in (ptys, pipes) for w in t.pool.workers]
            sys.stdout.write(json.dumps({"tools": tools, "workers": workers}) + "\\n")
            sys.stdout.flush()
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def _still_running(pids: list[int], timeout: float) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_parent_sigkill_leaves_no_tool_process_behind() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert parent.stdout is not None
        for line in parent.stdout:  # structlog's own lines come first
            if line.startswith('{"tools"'):
                break
        else:
            raise AssertionError("the parent did not start its tool pools")
        pids = json.loads(line)
        everything = [*pids["tools"], *pids["workers"]]
        assert len(pids["tools"]) == 4 and all(psutil.pid_exists(p) for p in everything)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        alive = _still_running(everything, timeout=2.0)
        assert not alive, f"still running after the parent died: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout:
            parent.stdout.close()
