"""What the Pools front costs per call: parent CPU over a direct ``Pool.call``.

    python -m benchmarks.routing                  # 20000 calls per block, 7 rounds
    python -m benchmarks.routing --calls 2000 --rounds 2

One pool of 2 workers runs ``noop``. Each round measures, in blocks of
``--calls`` sequential calls, the parent's CPU time (``time.process_time()``:
this process only, the workers are other processes) for

- ``direct``: ``pool.call("noop")``;
- ``front``: ``pools.call("noop", workload="main")``: the workload named, its
  chain ``main`` then ``spare`` (the fallback is never needed), the breaker
  closed, the retry budget counted;
- ``front+rule``: ``pools.call("noop")``: the second of two method rules picks
  that workload.

Blocks alternate inside each round, and the order rotates from round to
round, so drift on a shared machine hits every mode alike; the figure is the
median over rounds of each mode's CPU per call minus ``direct``'s in the same
round. CPU time, not wall time: waiting for the
workers costs the parent nothing, and the front's cost is all parent CPU.

A direct call costs the parent tens of microseconds, and on a shared machine
that moves by more than the front costs; so the same three modes also run
against a stand-in pool whose ``call`` returns at once (``--isolated``, 10x the
calls): there, the difference is the front's own code and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from corral import Pool, Pools, Rule, Workload

TARGET = "benchmarks.corral_app:app"


async def _block(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Parent CPU seconds per call over ``calls`` sequential calls."""
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls


class _InstantPool:
    """Stands in for a pool in the isolated run: ``call`` returns at once."""

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        return None


async def measure(calls: int, rounds: int, isolated: bool = False) -> dict[str, list[float]]:
    pool = Pool(TARGET, size=2, name="main")
    spare = Pool(TARGET, size=1, name="spare")
    pools = Pools(
        pool,
        spare,
        workloads={
            "main": Workload(["main", "spare"]),
            "other": ["spare"],
            "third": ["spare"],
        },
        rules=[Rule("other", methods=["cpu_1ms"]), Rule("main", methods=["noop"])],
        default="third",
    )
    figures: dict[str, list[float]] = {"direct": [], "front": [], "front+rule": []}
    async with pools:
        target: Any = pool
        real = {name: m.pool for name, m in pools._members.items()}
        if isolated:
            target = _InstantPool()
            for member in pools._members.values():
                member.pool = target
        modes: dict[str, Callable[[], Awaitable[Any]]] = {
            "direct": lambda: target.call("noop"),
            "front": lambda: pools.call("noop", workload="main"),
            "front+rule": lambda: pools.call("noop"),
        }
        for call in modes.values():  # warm up every path
            await _block(call, max(100, calls // 10))
        names = list(modes)
        for round_no in range(rounds):
            shift = round_no % len(names)  # each mode takes each place in turn
            for name in names[shift:] + names[:shift]:
                figures[name].append(await _block(modes[name], calls))
        for name, member in pools._members.items():
            member.pool = real[name]
    return figures


def report(figures: dict[str, list[float]], label: str) -> str:
    direct = figures["direct"]
    lines = [f"{label}: direct median {statistics.median(direct) * 1e6:.2f} us CPU per call"]
    for name in ("front", "front+rule"):
        overhead = [f - d for f, d in zip(figures[name], direct, strict=True)]
        lines.append(
            f"{name:10} overhead: median {statistics.median(overhead) * 1e6:+.2f} us CPU per call"
            f" (rounds: {', '.join(f'{o * 1e6:+.2f}' for o in overhead)})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per block")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of blocks")
    args = parser.parse_args(argv)
    import logging

    import structlog

    # corral logs through structlog; keep its lines off the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    isolated = asyncio.run(measure(args.calls * 10, args.rounds, isolated=True))
    sys.stdout.write(report(isolated, "stand-in pool (the front's own cost)") + "\n")
    real = asyncio.run(measure(args.calls, args.rounds))
    sys.stdout.write(report(real, "real pool, 2 workers") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
