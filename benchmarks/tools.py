"""How fast a ToolPool of Python REPLs gets ready, answers and closes.

    python -m benchmarks.tools [--rounds 5] [--sizes 3 5] [--calls 200]

For each size: the time from ``ToolPool(...)`` to every instance showing its
prompt (median and max over the rounds), the time to restart every instance
at once in the running pool (the programs alone, no worker start), the idle
round trip of ``run("1+1")`` on one instance (p50 and p99 over ``--calls``),
and the time ``aclose()`` takes. For comparison, the floors: the same number of
bare REPLs started at once with plain asyncio subprocesses, and one corral
worker of the tools app starting. Figures only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time

import structlog

from corral import Pool
from corral.tools import ToolPool
from corral.tools._pool import WORKER_TARGET

REPL = [sys.executable, "-i", "-q"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def _bare_repl() -> None:
    proc = await asyncio.create_subprocess_exec(
        *REPL,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    seen = b""
    while not seen.endswith(b">>> "):
        chunk = await proc.stdout.read(4096)
        if not chunk:
            raise RuntimeError(f"the REPL ended: {seen!r}")
        seen += chunk
    proc.stdin.close()
    await proc.wait()


async def _floors(size: int, rounds: int) -> tuple[float, float]:
    """Median seconds: ``size`` bare REPLs at once to their prompt; one tools worker."""
    bare, worker = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await asyncio.gather(*(_bare_repl() for _ in range(size)))
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        async with Pool(WORKER_TARGET, size=1):
            worker.append(time.perf_counter() - t0)
    return statistics.median(bare), statistics.median(worker)


async def _one_round(size: int, mode: str, calls: int) -> tuple[float, float, list[float], float]:
    began = time.perf_counter()
    tools = ToolPool(REPL, size=size, prompt=">>> ", mode=mode)
    await tools.start()
    ready = time.perf_counter() - began
    trips: list[float] = []
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(i.restart() for i in tools.instances))
        respawn = time.perf_counter() - t0
        repl = tools.instances[0]
        for _ in range(calls):
            t0 = time.perf_counter()
            out = await repl.run("1+1")
            trips.append(time.perf_counter() - t0)
            assert out == "2\n", out
    finally:
        t0 = time.perf_counter()
        await tools.aclose()
        closed = time.perf_counter() - t0
    return ready, respawn, trips, closed


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--modes", nargs="+", default=["pty", "pipes"])
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"python REPL: {' '.join(REPL)}, {args.rounds} rounds, {args.calls} calls per round")
    print(
        f"{'mode':6} {'size':>4} {'ready p50':>11} {'ready max':>11} {'restart all':>12} "
        f"{'run p50':>10} {'run p99':>10} {'close p50':>11} {'bare REPLs':>11} {'1 worker':>9}"
    )
    for mode in args.modes:
        for size in args.sizes:
            bare, worker = await _floors(size, args.rounds)
            readies, respawns, trips, closes = [], [], [], []
            for _ in range(args.rounds):
                ready, respawn, round_trips, closed = await _one_round(size, mode, args.calls)
                readies.append(ready)
                respawns.append(respawn)
                trips.extend(round_trips)
                closes.append(closed)
            trips.sort()
            p99 = trips[min(len(trips) - 1, int(len(trips) * 0.99))]
            print(
                f"{mode:6} {size:>4} {_ms(statistics.median(readies)):>11} "
                f"{_ms(max(readies)):>11} {_ms(statistics.median(respawns)):>12} "
                f"{_ms(statistics.median(trips)):>10} "
                f"{_ms(p99):>10} {_ms(statistics.median(closes)):>11} {_ms(bare):>11} "
                f"{_ms(worker):>9}"
            )


if __name__ == "__main__":
    asyncio.run(main())
