"""What one call costs on each side, against the floor in the same run.

    python -m benchmarks.cost            # N = 30,000 calls per case, medians of 3 rounds
    python -m benchmarks.cost --quick    # smoke test: small counts, 1 round

Four cases, each one worker, sequential no-op calls, this process and the
worker pinned to one CPU (the worker inherits the affinity):

- ``floor``: benchmarks/floor.py (asyncio parent, blocking worker loop);
- ``sync-only app``: corral, the sync ``noop`` of an app with sync handlers only;
- ``sync, mixed app``: the same handler in an app that also has an async one;
- ``async handler``: that app's async ``anoop``.

Tables, each with its ratio to the floor:

- CPU per call on each side, read from the processes' own counters (this
  process's ``CLOCK_PROCESS_CPUTIME_ID``; the worker's threads'
  ``/proc/PID/task/*/schedstat``), steady on a shared machine unlike wall time;
- system calls per call on each side, from ``strace -f`` over N calls minus a
  run with no calls (needs strace: the table says so when it is missing);
- idle worker RSS over a bare interpreter's, and the cold start of a pool of 4.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from benchmarks.floor import FloorPool
from corral._bench_floor import settle_malloc

MIB = 1024 * 1024
CASES = ("floor", "sync-only app", "sync, mixed app", "async handler")
_TARGETS = {
    "sync-only app": ("benchmarks.corral_app:app", "noop"),
    "sync, mixed app": ("benchmarks.corral_mixed_app:app", "noop"),
    "async handler": ("benchmarks.corral_mixed_app:app", "anoop"),
}
STRACE_MISSING = (
    "system calls: strace is not installed, so this table is skipped (apt-get install -y strace)"
)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CostCounts:
    cpu_calls: int
    rounds: int
    strace_calls: int
    cold_starts: int


FULL = CostCounts(cpu_calls=30_000, rounds=3, strace_calls=2_000, cold_starts=5)
QUICK = CostCounts(cpu_calls=300, rounds=1, strace_calls=100, cold_starts=1)

Noop = Callable[[], Awaitable[Any]]


# --- one case: a one-worker system and its worker's pid ------------------------------


@contextlib.asynccontextmanager
async def open_case(case: str, size: int = 1) -> AsyncIterator[tuple[Noop, list[int]]]:
    """Start ``case`` with ``size`` workers; yields a no-op call and the workers' pids."""
    if case == "floor":
        async with FloorPool(size) as floor:
            yield (lambda: floor.call("noop")), [w.proc.pid for w in floor.workers]
        return
    import corral

    target, method = _TARGETS[case]
    async with corral.Pool(target, size=size) as pool:
        pids = [w.pid for w in pool.workers if w.pid is not None]
        yield (lambda: pool.call(method)), pids


def pin(cpus: set[int] | None) -> None:
    """This process (and the children it starts from now on) on ``cpus``; None: all."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus or set(range(os.cpu_count() or 1)))


def thread_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid``, in nanoseconds (Linux schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        # a thread that ended meanwhile is skipped
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- CPU per call ----------------------------------------------------------------


async def cpu_per_call(case: str, n: int) -> tuple[float, float, float]:
    """(parent, worker, wall) microseconds per sequential call, pinned to one CPU."""
    pin({0})
    try:
        async with open_case(case) as (call, pids):
            for _ in range(min(n, 1000)):
                await call()
            parent0, worker0 = time.process_time_ns(), thread_cpu_ns(pids[0])
            started = time.perf_counter_ns()
            for _ in range(n):
                await call()
            wall = time.perf_counter_ns() - started
            parent, worker = time.process_time_ns() - parent0, thread_cpu_ns(pids[0]) - worker0
    finally:
        pin(None)
    return parent / n / 1000, worker / n / 1000, wall / n / 1000


async def cpu_table(counts: CostCounts) -> dict[str, tuple[float, float, float]]:
    """Median of the rounds; each round measures every case, so load hits them alike."""
    samples: dict[str, list[tuple[float, float, float]]] = {case: [] for case in CASES}
    for _ in range(counts.rounds):
        for case in CASES:
            samples[case].append(await cpu_per_call(case, counts.cpu_calls))
    return {
        case: (
            statistics.median(s[0] for s in values),
            statistics.median(s[1] for s in values),
            statistics.median(s[2] for s in values),
        )
        for case, values in samples.items()
    }


# --- system calls per call ---------------------------------------------------------


async def _traced_child(case: str, n: int) -> None:
    """Body of ``--trace-child``: warm up, N calls, then name each side's threads."""
    pin({0})
    async with open_case(case) as (call, pids):
        for _ in range(200):
            await call()
        for _ in range(n):
            await call()
        sides = {
            "parent": os.listdir(f"/proc/{os.getpid()}/task"),
            "worker": os.listdir(f"/proc/{pids[0]}/task"),
        }
        sys.stdout.write(json.dumps(sides) + "\n")
        sys.stdout.flush()


def _count_trace(prefix: Path, sides: dict[str, list[str]]) -> dict[str, Counter[str]]:
    """System calls in each side's per-thread strace files, by name."""
    counts: dict[str, Counter[str]] = {side: Counter() for side in sides}
    for side, tids in sides.items():
        for tid in tids:
            path = Path(f"{prefix}.{tid}")
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                # "<... read resumed>" continues a call counted already;
                # signals and exits are not calls
                if line.startswith(("<...", "---", "+++")):
                    continue
                name = line.split("(", 1)[0].strip()
                if name.isidentifier():
                    counts[side][name] += 1
    return counts


def _trace(strace: str, case: str, n: int) -> dict[str, Counter[str]]:
    with tempfile.TemporaryDirectory(prefix="corral-strace-") as tmp:
        prefix = Path(tmp) / "trace"
        command = [strace, "-f", "-ff", "-qq", "-o", str(prefix), sys.executable, "-m"]
        command += ["benchmarks.cost", "--trace-child", case, str(n)]
        run = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"traced run of {case!r} failed:\n{run.stderr[-2000:]}")
        sides = json.loads(run.stdout.strip().splitlines()[-1])
        return _count_trace(prefix, sides)


def syscall_table(counts: CostCounts) -> dict[str, dict[str, Counter[str]]] | None:
    """Per case and side, system calls per call by name (N calls minus none); None: no strace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    table: dict[str, dict[str, Counter[str]]] = {}
    for case in CASES:
        base = _trace(strace, case, 0)
        loaded = _trace(strace, case, counts.strace_calls)
        table[case] = {}
        for side in ("parent", "worker"):
            per_call: Counter[str] = Counter()
            for name in set(loaded[side]) | set(base[side]):
                diff = (loaded[side][name] - base[side][name]) / counts.strace_calls
                if abs(diff) >= 0.05:
                    per_call[name] = diff  # type: ignore[assignment]
            table[case][side] = per_call
    return table


# --- memory and cold start ----------------------------------------------------------


async def bare_interpreter_rss() -> int:
    """RSS of a Python process that has started and does nothing."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; sys.stdout.write('up\\n'); sys.stdout.flush(); sys.stdin.read()",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    await proc.stdout.readline()
    try:
        return rss_of(proc.pid)
    finally:
        proc.stdin.close()
        await proc.wait()


async def idle_rss() -> dict[str, int]:
    """Bytes resident in an idle worker of each kind, and in a bare interpreter."""
    sizes = {"bare interpreter": await bare_interpreter_rss()}
    for case in CASES[:3]:
        async with open_case(case) as (call, pids):
            await call()
            sizes[case] = rss_of(pids[0])
    return sizes


async def cold_start(case: str) -> float:
    """Milliseconds from nothing to a pool of 4 that has answered one call on each worker."""
    started = time.perf_counter()
    async with open_case(case, size=4) as (call, _):
        await asyncio.gather(*(call() for _ in range(4)))
        elapsed = time.perf_counter() - started
    return elapsed * 1000


# --- printing ------------------------------------------------------------------


def _ratio(value: float, floor: float) -> str:
    return f"({value / floor:.2f}x)" if floor else ""


def print_cpu(table: dict[str, tuple[float, float, float]], n: int, out: TextIO) -> None:
    floor = table["floor"]
    out.write(f"\nCPU per sequential no-op call, µs (one CPU, {n:,} calls, median of rounds)\n")
    head = f"{'case':<20}{'parent':>20}{'worker':>20}{'wall':>20}"
    out.write(head + "\n" + "-" * len(head) + "\n")
    for case, figures in table.items():
        row = f"{case:<20}"
        for value, base in zip(figures, floor, strict=True):
            row += f"{f'{value:.1f} {_ratio(value, base)}':>20}"
        out.write(row + "\n")


def print_syscalls(table: dict[str, dict[str, Counter[str]]] | None, n: int, out: TextIO) -> None:
    if table is None:
        out.write(f"\n{STRACE_MISSING}\n")
        return
    out.write(f"\nSystem calls per sequential call (strace -f, {n:,} calls minus none)\n")
    head = f"{'case':<20}{'parent':>10}{'worker':>10}{'total':>10}{'vs floor':>10}  worker's"
    out.write(head + "\n" + "-" * len(head) + "\n")
    floor_total = sum(table["floor"]["parent"].values()) + sum(table["floor"]["worker"].values())
    for case, sides in table.items():
        parent, worker = sum(sides["parent"].values()), sum(sides["worker"].values())
        total = parent + worker
        top = ", ".join(f"{name} {count:.1f}" for name, count in sides["worker"].most_common(6))
        out.write(
            f"{case:<20}{parent:>10.1f}{worker:>10.1f}{total:>10.1f}"
            f"{total - floor_total:>+10.1f}  {top}\n"
        )
    out.write("parent's, by name: ")
    out.write(
        "; ".join(
            f"{case}: " + ", ".join(f"{k} {v:.1f}" for k, v in sides["parent"].most_common(5))
            for case, sides in table.items()
        )
        + "\n"
    )


def uncompiled_modules() -> list[str]:
    """corral's modules without up-to-date compiled bytecode (``__pycache__``).

    A worker compiles each of them at start and keeps about 2 MiB more for it
    (docs/performance.md, Idle memory): an installed wheel has its bytecode, a
    checkout run with ``PYTHONDONTWRITEBYTECODE`` may not.
    """
    import importlib.util

    import corral

    missing = []
    for source in sorted(Path(corral.__file__).parent.rglob("*.py")):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            missing.append(source.name)
    return missing


def print_memory(rss: dict[str, int], starts: dict[str, float], out: TextIO) -> None:
    bare = rss["bare interpreter"]
    out.write(f"\nIdle worker RSS (bare interpreter {bare / MIB:.1f} MiB)\n")
    for case, size in rss.items():
        if case != "bare interpreter":
            out.write(f"  {case:<20}{size / MIB:>7.1f} MiB  (+{(size - bare) / MIB:.1f} MiB)\n")
    missing = uncompiled_modules()
    if missing:
        out.write(
            f"  ({len(missing)} of corral's modules have no compiled bytecode: each worker "
            "compiles them and keeps about 2 MiB more; `python -m compileall src` first)\n"
        )
    floor = starts["floor"]
    out.write("Cold start, pool of 4 to one answer from each worker (median)\n")
    for case, ms in starts.items():
        out.write(f"  {case:<20}{ms:>7.0f} ms  {_ratio(ms, floor)}\n")
    out.flush()


async def main_async(quick: bool, out: TextIO = sys.stdout) -> None:
    """Measure and print every cost table (``benchmarks.run`` prints them too)."""
    counts = QUICK if quick else FULL
    sys.stderr.write("measuring CPU per call, pinned to one CPU ...\n")
    cpu = await cpu_table(counts)
    print_cpu(cpu, counts.cpu_calls, out)
    sys.stderr.write("counting system calls per call with strace ...\n")
    syscalls = await asyncio.to_thread(syscall_table, counts)
    print_syscalls(syscalls, counts.strace_calls, out)
    sys.stderr.write("measuring idle RSS and cold start ...\n")
    rss = await idle_rss()
    starts = {
        case: statistics.median([await cold_start(case) for _ in range(counts.cold_starts)])
        for case in CASES[:2]
    }
    print_memory(rss, starts, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--trace-child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet_logs()
    settle_malloc()  # malloc as a long-running process has it, in the traced children too
    if args.trace_child:
        asyncio.run(_traced_child(args.trace_child[0], int(args.trace_child[1])))
        return
    asyncio.run(main_async(args.quick))


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


if __name__ == "__main__":
    main()
