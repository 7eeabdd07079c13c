"""The parent's CPU per call: corral against the floor, read from process CPU counters.

Wall time drifts on a shared machine; the CPU a process spent does not drift
much. Each system runs in a process of its own (so the counters hold that
system alone), pinned to one CPU with its workers (``taskset -c 0`` around the
whole run), and makes ``--calls`` sequential no-op calls on one worker. Then
64 callers in flight over two workers measure throughput.

    taskset -c 0 python -m benchmarks.parent_cpu [--calls 30000] [--rounds 3]
        [--profile DIR] [--baseline SRC]

The systems run in turns, ``--rounds`` times, and each figure is the best of
its rounds (the least CPU, the most calls per second): a neighbour's load only
ever adds to a process's CPU, so the least is the closest to its own cost, and
taking turns lets the load hit every system alike. ``--baseline SRC``
adds another corral (a source tree's ``src`` directory, e.g. an older commit
unpacked with ``git archive``) as a third system, measured in the same turns.

``--profile DIR`` runs corral's sequential loop under cProfile instead, writes
``DIR/corral.prof`` and prints the top of it (the CPU figures of that run
include the profiler's own cost: take them from a run without it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
Call = Callable[..., Awaitable[Any]]


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _sequential(call: Call, worker_pid: int, n: int, profile: str | None) -> dict[str, float]:
    for _ in range(500):  # warm up
        await call("noop")
    profiler = cProfile.Profile() if profile else None
    parent0, worker0, wall0 = time.process_time(), _cpu_of(worker_pid), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for _ in range(n):
        await call("noop")
    if profiler is not None:
        profiler.disable()
        assert profile is not None
        profiler.dump_stats(profile)
    wall = time.perf_counter() - wall0
    return {
        "parent_us": (time.process_time() - parent0) / n * 1e6,
        "worker_us": (_cpu_of(worker_pid) - worker0) / n * 1e6,
        "wall_us": wall / n * 1e6,
    }


async def _throughput(call: Call, n: int, in_flight: int = 64) -> float:
    left = n

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call("noop")

    await asyncio.gather(*(call("noop") for _ in range(in_flight)))
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return n / (time.perf_counter() - started)


async def _floor(n: int, profile: str | None) -> dict[str, float]:
    from benchmarks.floor import FloorPool

    async with FloorPool(1) as one:
        worker = one.workers[0]
        figures = await _sequential(worker.call, worker.proc.pid, n, profile)
    async with FloorPool(2) as two:
        figures["calls_per_s_64"] = await _throughput(two.call, n)
    return figures


async def _corral(n: int, profile: str | None) -> dict[str, float]:
    import corral

    async with corral.Pool("benchmarks.corral_app:app", size=1) as one:
        pid = one.workers[0].pid
        assert pid is not None
        figures = await _sequential(one.call, pid, n, profile)
    async with corral.Pool("benchmarks.corral_app:app", size=2) as two:
        figures["calls_per_s_64"] = await _throughput(two.call, n)
    return figures


def _child(system: str, n: int, profile: str | None) -> None:
    from corral._bench_floor import settle_malloc

    settle_malloc()  # each system in a fresh process: malloc as a long-running one has it
    run = _floor if system == "floor" else _corral
    print(json.dumps(asyncio.run(run(n, profile))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parent_cpu")
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", metavar="SRC", help="another corral's src directory")
    parser.add_argument("--profile", metavar="DIR", help="write DIR/corral.prof (cProfile)")
    parser.add_argument("--child", choices=("floor", "corral"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.calls, args.profile_file)
        return
    systems = ["floor", "corral"] + (["baseline"] if args.baseline else [])
    rounds: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
    for _ in range(args.rounds):
        for system in systems:
            command = [sys.executable, "-m", "benchmarks.parent_cpu", "--calls", str(args.calls)]
            command += ["--child", "floor" if system == "floor" else "corral"]
            env = dict(os.environ)
            if system == "baseline":
                env["PYTHONPATH"] = os.pathsep.join([args.baseline, os.getcwd()])
            if args.profile and system == "corral":
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                command += ["--profile-file", str(Path(args.profile) / "corral.prof")]
            run = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            rounds[system].append(json.loads(run.stdout.strip().splitlines()[-1]))
    results = {
        system: {
            key: (max if key == "calls_per_s_64" else min)(r[key] for r in runs) for key in runs[0]
        }
        for system, runs in rounds.items()
    }
    floor = results["floor"]
    heads = ("parent CPU/call", "worker CPU/call", "wall/call", "64 in flight")
    print(f"{'':8} {heads[0]:>16} {heads[1]:>16} {heads[2]:>10} {heads[3]:>14}")
    for system, r in results.items():
        print(
            f"{system:8} {r['parent_us']:13.1f} us {r['worker_us']:13.1f} us "
            f"{r['wall_us']:7.1f} us {r['calls_per_s_64']:9.0f} /s"
        )
    for system in systems[1:]:
        r = results[system]
        print(
            f"{system + '/fl':8} {r['parent_us'] / floor['parent_us']:14.2f}x "
            f"{r['worker_us'] / floor['worker_us']:14.2f}x "
            f"{r['wall_us'] / floor['wall_us']:8.2f}x "
            f"{r['calls_per_s_64'] / floor['calls_per_s_64']:12.2f}x"
        )


if __name__ == "__main__":
    main()
