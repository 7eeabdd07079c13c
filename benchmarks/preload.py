"""How soon a replacement worker serves, with and without preloading.

    python -m benchmarks.preload                 # 10 crashes per mode, 1 s import
    python -m benchmarks.preload --rounds 3 --import-seconds 0.5

The worker's module imports ``benchmarks.heavy_module``, which takes
``--import-seconds`` to import. For each mode (``plain``: every worker imports
it; ``preload``: ``Pool(..., preload=["benchmarks.heavy_module"])``) a one-worker
pool has its worker crash ``--rounds`` times; after each crash a call waits for
the replacement. Two figures per crash:

- launch to first result: from the moment the pool starts the replacement
  (its handle is created) to the first call's result on it;
- crash to first result: from the crash reaching the caller to that result
  (adds the pool's detection and supervisor wake-up).

Rounds are spaced by 1.1 s so the pool's crash-storm backoff (more deaths
within a second than workers) never kicks in. Medians, p90 and max go to
stdout, in milliseconds. Timings on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from corral import Pool, WorkerCrashed

TARGET = "benchmarks.preload_app:app"
HEAVY = "benchmarks.heavy_module"


async def measure(preload: bool, rounds: int, import_seconds: float) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"launch": [], "crash": []}
    pool = Pool(
        TARGET,
        size=1,
        preload=[HEAVY] if preload else [],
        env={"CORRAL_BENCH_IMPORT_SECONDS": str(import_seconds)},
        startup_timeout=30 + 3 * import_seconds,
    )
    async with pool:
        await pool.call("noop")
        for _ in range(rounds):
            await asyncio.sleep(1.1)  # stay clear of the crash-storm backoff
            try:
                await pool.call("crash")
            except WorkerCrashed:
                crashed = time.monotonic()
            else:
                raise AssertionError("the crash handler returned")
            await pool.call("noop")  # waits for the replacement
            done = time.monotonic()
            replacement = pool.workers[-1]
            figures["launch"].append((done - replacement.started_at) * 1000)
            figures["crash"].append((done - crashed) * 1000)
    return figures


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered):8.1f}  p90 {p90:8.1f}  max {ordered[-1]:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--import-seconds", type=float, default=1.0)
    args = parser.parse_args()
    import logging

    import structlog

    # corral logs through structlog; keep its lines off the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(
        f"replacement worker, first call, ms ({args.rounds} crashes per mode, "
        f"import takes {args.import_seconds} s)"
    )
    for preload in (False, True):
        mode = "preload" if preload else "plain"
        print(f"measuring {mode} ...", file=sys.stderr)
        figures = asyncio.run(measure(preload, args.rounds, args.import_seconds))
        print(f"{mode:8} launch to first result: {summary(figures['launch'])}")
        print(f"{mode:8} crash to first result:  {summary(figures['crash'])}")


if __name__ == "__main__":
    main()
