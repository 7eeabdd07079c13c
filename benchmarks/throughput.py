"""CPU per call under load: 64 callers in flight over two workers, corral against the floor.

The throughput figure of ``benchmarks.run`` is one wall-clock number; on a
shared machine it moves with the neighbours' load. This run reads what each
side spent instead: the parent's CPU (its own counter) and the two workers'
CPU (from /proc), per call, while 64 callers keep calls in flight, and the
calls per second of the same run. Each system runs in a process of its own,
in turns, ``--rounds`` times; each figure is the best of its rounds (a
neighbour's load only ever adds CPU, and only ever takes calls per second).

    python -m benchmarks.throughput [--calls 30000] [--rounds 3] [--uvloop]
        [--max-concurrency N ...] [--profile DIR] [--baseline SRC]

``--max-concurrency`` adds a corral column per value (the default pool is
always measured). ``--baseline SRC`` adds another corral (a source tree's
``src`` directory, e.g. an older commit unpacked with ``git archive``).
``--profile DIR`` runs the corral parent's loop under cProfile and writes
``DIR/corral-throughput.prof`` (its CPU figures include the profiler's cost).
``--child`` runs one system and prints its figures as JSON: run it under
``strace -f -c`` to count system calls per call.
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
IN_FLIGHT = 64
WORKERS = 2
Call = Callable[..., Awaitable[Any]]


def _io_of(pid: int) -> tuple[int, int]:
    """Read-like and write-like system calls of a process so far, from /proc (Linux)."""
    counts = dict.fromkeys((b"syscr", b"syscw"), 0)
    with open(f"/proc/{pid}/io", "rb") as io:
        for line in io:
            key, _, value = line.partition(b":")
            if key in counts:
                counts[key] = int(value)
    return counts[b"syscr"], counts[b"syscw"]


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _load(
    call: Call, worker_pids: list[int], n: int, profile: str | None
) -> dict[str, float]:
    """``n`` no-op calls by 64 callers; calls/s and CPU per call on each side."""
    left = n

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call("noop")

    for _ in range(5):  # warm up: every caller, every worker
        await asyncio.gather(*(call("noop") for _ in range(IN_FLIGHT)))
    profiler = cProfile.Profile() if profile else None
    workers0 = sum(_cpu_of(pid) for pid in worker_pids)
    io0 = [_io_of(pid) for pid in (os.getpid(), *worker_pids)]
    parent0, wall0 = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    if profiler is not None:
        profiler.disable()
        assert profile is not None
        profiler.dump_stats(profile)
    wall = time.perf_counter() - wall0
    parent = time.process_time() - parent0
    workers = sum(_cpu_of(pid) for pid in worker_pids) - workers0
    io = [_io_of(pid) for pid in (os.getpid(), *worker_pids)]
    reads = [(after[0] - before[0]) / n for before, after in zip(io0, io, strict=True)]
    writes = [(after[1] - before[1]) / n for before, after in zip(io0, io, strict=True)]
    return {
        "calls_per_s": n / wall,
        "parent_us": parent / n * 1e6,
        "worker_us": workers / n * 1e6,
        "parent_reads": reads[0],
        "parent_writes": writes[0],
        "worker_reads": sum(reads[1:]),
        "worker_writes": sum(writes[1:]),
    }


async def _floor(n: int, profile: str | None, max_concurrency: int | None) -> dict[str, float]:
    from benchmarks.floor import FloorPool

    async with FloorPool(WORKERS) as pool:
        return await _load(pool.call, [w.proc.pid for w in pool.workers], n, profile)


async def _corral(n: int, profile: str | None, max_concurrency: int | None) -> dict[str, float]:
    import corral

    options: dict[str, Any] = {}
    if max_concurrency is not None:
        options["max_concurrency"] = max_concurrency
    async with corral.Pool("benchmarks.corral_app:app", size=WORKERS, **options) as pool:
        pids = [w.pid for w in pool.workers]
        assert None not in pids
        return await _load(pool.call, pids, n, profile)  # type: ignore[arg-type]


def _child(system: str, n: int, profile: str | None, max_concurrency: int | None, uv: bool) -> None:
    from corral._bench_floor import settle_malloc

    settle_malloc()  # each system in a fresh process: malloc as a long-running one has it
    run = _floor if system == "floor" else _corral
    if uv:
        import uvloop

        figures = uvloop.run(run(n, profile, max_concurrency))
    else:
        figures = asyncio.run(run(n, profile, max_concurrency))
    print(json.dumps(figures))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput")
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="corral's parent on uvloop")
    parser.add_argument("--max-concurrency", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument("--baseline", metavar="SRC", help="another corral's src directory")
    parser.add_argument("--profile", metavar="DIR", help="write DIR/corral-throughput.prof")
    parser.add_argument("--child", choices=("floor", "corral"), help=argparse.SUPPRESS)
    parser.add_argument("--child-max-concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.calls, args.profile_file, args.child_max_concurrency, args.uvloop)
        return
    # The floor always runs on asyncio: the targets are ratios to the asyncio floor.
    systems: dict[str, list[str]] = {"floor": ["--child", "floor"]}
    uv = ["--uvloop"] if args.uvloop else []
    systems["corral" + (" uvloop" if uv else "")] = ["--child", "corral", *uv]
    for n in args.max_concurrency:
        name = f"mc={n}" + (" uvloop" if uv else "")
        systems[name] = ["--child", "corral", "--child-max-concurrency", str(n), *uv]
    if args.baseline:
        for name, child in list(systems.items())[1:]:
            systems["base " + name] = child
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, child in systems.items():
            command = [sys.executable, "-m", "benchmarks.throughput", "--calls", str(args.calls)]
            command += child
            env = dict(os.environ)
            if name.startswith("base "):
                env["PYTHONPATH"] = os.pathsep.join([args.baseline, os.getcwd()])
            if args.profile and name.startswith("corral"):  # the last round's
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                command += ["--profile-file", str(Path(args.profile) / "corral-throughput.prof")]
            run = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            rounds[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    best = {
        name: {key: (max if key == "calls_per_s" else min)(r[key] for r in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }
    floor = best["floor"]
    heads = ("calls/s", "parent CPU/call", "workers CPU/call", "reads+writes/call")
    print(f"{'':16} {heads[0]:>16} {heads[1]:>20} {heads[2]:>20} {heads[3]:>24}")

    def ratio(r: dict[str, float], key: str) -> str:
        # A quick run can measure no CPU at all (the counters tick every 10 ms).
        return f"({r[key] / floor[key]:4.2f}x)" if floor[key] else "(  n/a)"

    for name, r in best.items():
        print(
            f"{name:16} {r['calls_per_s']:9.0f} {ratio(r, 'calls_per_s')}"
            f" {r['parent_us']:9.1f} us {ratio(r, 'parent_us')}"
            f" {r['worker_us']:9.1f} us {ratio(r, 'worker_us')}"
            f"   parent {r['parent_reads']:.2f}+{r['parent_writes']:.2f}"
            f" workers {r['worker_reads']:.2f}+{r['worker_writes']:.2f}"
        )


if __name__ == "__main__":
    main()
