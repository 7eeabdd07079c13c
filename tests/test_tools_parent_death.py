"""No program of a ToolPool outlives its owner: the pool's process SIGKILLed, or its worker."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import psutil
from tests._processes import parent_program, still_running

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


def test_parent_sigkill_leaves_no_tool_process_behind() -> None:
    with parent_program(PARENT, reports='{"tools"') as (parent, pids):
        everything = [*pids["tools"], *pids["workers"]]
        assert len(pids["tools"]) == 4 and all(psutil.pid_exists(p) for p in everything)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        alive = still_running(everything, timeout=2.0)
        assert not alive, f"still running after the parent died: {alive}"
