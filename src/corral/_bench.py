"""``corral bench``: what one call costs on this machine, against a hand-written floor.

Owns: the installed package's own benchmark. corral and a floor (a minimal
asyncio client with a blocking worker loop over two pipes, ``_bench_floor``)
each run in a child process of their own, in turns, pinned to one CPU with
their workers; each makes sequential no-op calls on one worker, read from the
processes' own CPU counters (steady on a busy machine, unlike wall time), then
64 callers in flight over two workers measure throughput. The table on stdout
gives each figure and corral's ratio to the floor.

Must not touch: the repository's ``benchmarks/`` folder (the comparison with
other libraries behind docs/performance.md, run by ``nox -s bench``): nothing
here imports it or looks for it. The progress bar needs rich (the ``cli``
extra); the measuring children import only corral.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["build_parser", "measure", "run_bench"]

_TICK = os.sysconf("SC_CLK_TCK")
_IN_FLIGHT = 64
SYSTEMS = ("floor", "corral")
Call = Callable[..., Awaitable[Any]]


def _cpu_of(pid: int) -> float:
    """CPU seconds of another process's threads, from /proc.

    Each thread's ``schedstat`` counts nanoseconds on the CPU: a quick run of a
    few thousand 5 us calls is far below the clock ticks (10 ms) of ``stat``,
    which is read only where ``schedstat`` is missing.
    """
    try:
        total = 0
        for thread in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{thread}/schedstat", "rb") as schedstat:
                total += int(schedstat.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK


def _ratio(top: float, bottom: float, width: int) -> str:
    """``top / bottom`` as ``N.NNx``, or ``n/a`` when nothing was measured below."""
    return f"{top / bottom:{width}.2f}x" if bottom > 0 else f"{'n/a':>{width + 1}}"


async def _sequential(call: Call, worker_pid: int, n: int) -> dict[str, float]:
    for _ in range(min(500, n)):  # warm up
        await call("noop")
    parent0, worker0, wall0 = time.process_time(), _cpu_of(worker_pid), time.perf_counter()
    for _ in range(n):
        await call("noop")
    wall = time.perf_counter() - wall0
    return {
        "parent_us": (time.process_time() - parent0) / n * 1e6,
        "worker_us": (_cpu_of(worker_pid) - worker0) / n * 1e6,
        "wall_us": wall / n * 1e6,
    }


async def _throughput(call: Call, n: int) -> float:
    left = n

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call("noop")

    await asyncio.gather(*(call("noop") for _ in range(_IN_FLIGHT)))
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(_IN_FLIGHT)))
    return n / (time.perf_counter() - started)


async def _floor(n: int) -> dict[str, float]:
    from ._bench_floor import FloorWorker

    one = FloorWorker()
    await one.start()
    try:
        figures = await _sequential(one.call, one.proc.pid, n)
    finally:
        await one.close()
    two = [FloorWorker(), FloorWorker()]
    await asyncio.gather(*(w.start() for w in two))

    def least_busy(method: str, *args: Any) -> Awaitable[Any]:
        return min(two, key=lambda w: len(w.pending)).call(method, *args)

    try:
        figures["calls_per_s"] = await _throughput(least_busy, n)
    finally:
        await asyncio.gather(*(w.close() for w in two))
    return figures


async def _corral(n: int) -> dict[str, float]:
    from ._pool import Pool

    async with Pool("corral._bench_app:app", size=1) as one:
        pid = one.workers[0].pid
        assert pid is not None
        figures = await _sequential(one.call, pid, n)
    async with Pool("corral._bench_app:app", size=2) as two:
        figures["calls_per_s"] = await _throughput(two.call, n)
    return figures


def measure(system: str, calls: int) -> dict[str, float]:
    """One system's figures, measured in this process (``corral bench`` runs it in a child)."""
    import logging

    import structlog

    # The pool's info logs would land on stdout, where the figures go.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from ._bench_floor import settle_malloc

    settle_malloc()  # both systems alike: the floor's first reads must not map memory
    return asyncio.run(_floor(calls) if system == "floor" else _corral(calls))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="What one call costs here: corral against a hand-written pipe floor, "
        "by the processes' CPU counters, pinned to one CPU.",
    )
    parser.add_argument("--calls", type=int, default=20_000, help="calls per figure")
    parser.add_argument("--rounds", type=int, default=3, help="turns per system (best is kept)")
    parser.add_argument("--quick", action="store_true", help="2,000 calls, one round")
    parser.add_argument(
        "--cpu", type=int, default=None, help="the CPU to pin to (default: the first allowed)"
    )
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    return parser


def _run_child(system: str, calls: int, cpu: int) -> dict[str, float]:
    command = [sys.executable, "-m", "corral._bench", "--child", system, "--calls", str(calls)]
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    if run.returncode != 0:
        raise RuntimeError(f"measuring {system} failed:\n{run.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return figures


def _table(results: dict[str, dict[str, float]]) -> str:
    heads = ("parent CPU/call", "worker CPU/call", "wall/call", f"{_IN_FLIGHT} in flight")
    lines = [f"{'':10} {heads[0]:>16} {heads[1]:>16} {heads[2]:>11} {heads[3]:>14}"]
    for system, r in results.items():
        lines.append(
            f"{system:10} {r['parent_us']:13.1f} us {r['worker_us']:13.1f} us "
            f"{r['wall_us']:8.1f} us {r['calls_per_s']:11.0f} /s"
        )
    floor, corral = results["floor"], results["corral"]
    lines.append(
        f"{'corral/floor':10} {_ratio(corral['parent_us'], floor['parent_us'], 15)} "
        f"{_ratio(corral['worker_us'], floor['worker_us'], 15)} "
        f"{_ratio(corral['wall_us'], floor['wall_us'], 10)} "
        f"{_ratio(corral['calls_per_s'], floor['calls_per_s'], 13)}"
    )
    return "\n".join(lines)


def run_bench(argv: list[str]) -> int:
    """``corral bench [--quick] [--calls N] [--rounds R] [--cpu C]``: the table on stdout."""
    args = build_parser(prog="corral bench").parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.calls)))
        return 0
    calls, rounds = (2_000, 1) if args.quick else (args.calls, args.rounds)
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    try:
        import rich  # noqa: F401 - the progress bar; checked before anything is measured
    except ImportError:
        from ._install import install_command

        sys.stderr.write(
            "corral bench draws its progress with rich, which is not installed: "
            f"{install_command('cli')}\n"
        )
        return 2
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    runs: dict[str, list[dict[str, float]]] = {system: [] for system in SYSTEMS}
    progress = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        redirect_stdout=False,
    )
    with progress:
        task = progress.add_task("measuring", total=rounds * len(SYSTEMS))
        for _ in range(rounds):
            for system in SYSTEMS:
                progress.update(task, description=f"{system}: {calls} calls")
                runs[system].append(_run_child(system, calls, cpu))
                progress.advance(task)
    results = {
        system: {
            key: (max if key == "calls_per_s" else min)(r[key] for r in figures)
            for key in figures[0]
        }
        for system, figures in runs.items()
    }
    print(f"corral bench: {calls} sequential no-op calls on one worker, then {_IN_FLIGHT} callers")
    print(f"over two workers; pinned to CPU {cpu}; best of {rounds} round(s) per system.")
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_bench(sys.argv[1:]))
