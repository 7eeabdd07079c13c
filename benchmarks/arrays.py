"""Arrays, tables and large bytes across the pool, against the usual alternatives.

    python -m benchmarks.arrays            # full run: medians of 5 repeats
    python -m benchmarks.arrays --quick    # smoke test: 1 repeat, small counts

Figures, all in one run, so that ratios hold on a loaded machine:

Default settings, except ``max_message_size`` (256 MiB, for the table).

- echo of 64 MiB ``bytes`` and of a 64 MiB float64 ``numpy.ndarray``: corral
  (default settings: shared memory over 256 KiB), corral with
  ``large_bytes="memoryview"`` (bytes only: they arrive as views of their
  segments), ``ProcessPoolExecutor`` (pickle) and ``anyio.to_process``;
- round trip of a 1,000,000-row, 10-column Arrow table (ints, floats, strings):
  corral against pickling it through ``ProcessPoolExecutor``;
- 1 KiB arrays against 1 KiB ``bytes`` per call, through corral;
- the peak of /dev/shm that corral's segments use under 64 concurrent 4 MiB
  echoes, of arrays and of bytes received as views;
- the 64 MiB float64 array (random, and compressible: whole numbers 0..100)
  echoed to a worker over TCP on loopback (``SubprocessShimLauncher``): with its
  buffer inline in the frame (``large_buffer_threshold=None``, how every array
  crossed TCP before streamed buffers), streamed after the frame, and streamed
  with lz4 and zstd compression.

Each figure is measured after a few warm-up calls: the first calls of a new
size fault in the segments that both sides keep for reuse (up to two each way
while a call's argument and the previous result are both still held).

Every rate is given twice: against wall time, and against the CPU time that
this process and its children spent (``psutil``), which stays meaningful when
other programs share the cores. GB/s are 10^9 bytes of payload per second of
one round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil

from benchmarks import array_tasks

WORKERS = 2
MIB = 1024 * 1024
Call = Callable[..., Awaitable[Any]]


def _cpu() -> float:
    """CPU seconds of this process and every live descendant.

    Read from the nanosecond counters (this process's clock, each descendant's
    threads' schedstat), not from the 10 ms ticks of ``cpu_times()``: a few
    thousand 1 KiB calls use less CPU than a handful of ticks.
    """
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(OSError, psutil.NoSuchProcess):
            total += _threads_cpu(child.pid)
    return total


def _threads_cpu(pid: int) -> float:
    """CPU seconds of every live thread of ``pid`` (Linux schedstat, nanoseconds)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total / 1e9


@contextlib.asynccontextmanager
async def corral_system() -> AsyncIterator[Call]:
    import corral

    # The 1M-row table is about 79 MiB: over the default limit of 65 MiB.
    async with corral.Pool(
        "benchmarks.array_app:app", size=WORKERS, max_message_size=256 * MIB
    ) as pool:
        yield pool.call


@contextlib.asynccontextmanager
async def executor_system() -> AsyncIterator[Call]:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(WORKERS) as executor:
        for _ in range(WORKERS):
            await loop.run_in_executor(executor, array_tasks.noop)

        async def call(method: str, *args: Any) -> Any:
            return await loop.run_in_executor(executor, array_tasks.TASKS[method], *args)

        yield call


@contextlib.asynccontextmanager
async def anyio_system() -> AsyncIterator[Call]:
    import anyio
    import anyio.to_process

    limiter = anyio.CapacityLimiter(WORKERS)

    async def call(method: str, *args: Any) -> Any:
        return await anyio.to_process.run_sync(array_tasks.TASKS[method], *args, limiter=limiter)

    await asyncio.gather(*(call("noop") for _ in range(WORKERS)))
    yield call


@contextlib.asynccontextmanager
async def corral_views_system() -> AsyncIterator[Call]:
    import corral

    async with corral.Pool(
        "benchmarks.array_app:app",
        size=WORKERS,
        max_message_size=256 * MIB,
        large_bytes="memoryview",
    ) as pool:
        yield pool.call


def tcp_system(**options: Any) -> Callable[[], contextlib.AbstractAsyncContextManager[Call]]:
    """A one-worker corral pool whose worker reaches it over TCP (loopback)."""

    @contextlib.asynccontextmanager
    async def system() -> AsyncIterator[Call]:
        import corral
        from corral._launch._socket_launcher import SubprocessShimLauncher

        async with corral.Pool(
            "benchmarks.array_app:app",
            size=1,
            launcher=SubprocessShimLauncher(),
            max_message_size=256 * MIB,
            **options,
        ) as pool:
            yield pool.call

    return system


SYSTEMS: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Call]]] = {
    "corral": corral_system,
    "corral views": corral_views_system,
    "ProcessPoolExecutor": executor_system,
    "anyio.to_process": anyio_system,
    "corral-tcp-inline": tcp_system(large_buffer_threshold=None),
    "corral-tcp": tcp_system(),
    "corral-tcp-lz4": tcp_system(compression="lz4"),
    "corral-tcp-zstd": tcp_system(compression="zstd"),
}
#: What the TCP systems echo (the rest is the local paths' business).
TCP_PAYLOADS = ("64 MiB float64 ndarray", "64 MiB compressible ndarray")
_CODEC_MODULES = {"corral-tcp-lz4": "lz4", "corral-tcp-zstd": "zstandard"}


WARM_UP = 3


async def round_trips(call: Call, value: Any, n: int) -> tuple[float, float]:
    """Seconds of wall and of CPU per echo of ``value`` (after a few warm-up calls)."""
    for _ in range(WARM_UP):
        result = await call("echo", value)
        del result
    cpu, wall = _cpu(), time.perf_counter()
    for _ in range(n):
        result = await call("echo", value)
        del result
    return (time.perf_counter() - wall) / n, (_cpu() - cpu) / n


def make_table(rows: int) -> Any:
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {}
    for k in range(4):
        columns[f"i{k}"] = rng.integers(0, 1 << 40, rows)
    for k in range(4):
        columns[f"f{k}"] = rng.random(rows)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon"])
    for k in range(2):
        columns[f"s{k}"] = pa.array(words[rng.integers(0, 5, rows)])
    return pa.table(columns)


async def peak_shm(n_calls: int, value: Any, **options: Any) -> tuple[int, int]:
    """Peak bytes of corral's named segments, and of /dev/shm used, during a burst
    of ``n_calls`` concurrent echoes of ``value``."""
    import corral

    base = _shm_used()
    peak_named = peak_used = 0
    stop = threading.Event()

    def sample(prefix: str) -> None:
        nonlocal peak_named, peak_used
        while not stop.is_set():
            named = 0
            with contextlib.suppress(OSError):
                for entry in os.scandir("/dev/shm"):
                    if entry.name.startswith(prefix):
                        with contextlib.suppress(OSError):
                            named += entry.stat().st_blocks * 512
            peak_named = max(peak_named, named)
            peak_used = max(peak_used, _shm_used() - base)
            time.sleep(0.0005)

    async with corral.Pool("benchmarks.array_app:app", size=WORKERS, **options) as pool:
        sampler = threading.Thread(target=sample, args=(pool._shm_prefix,), daemon=True)
        sampler.start()
        try:
            results = await asyncio.gather(*(pool.call("echo", value) for _ in range(n_calls)))
            assert all(len(r) == len(value) for r in results)
            del results
        finally:
            stop.set()
            sampler.join()
    return peak_named, peak_used


def _shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e9:6.2f}"


def _ratio(top: float, bottom: float, spec: str) -> str:
    """``top / bottom`` formatted; "n/a" when a short run measured no time at all
    (a CPU counter's tick is coarser than a few quick calls)."""
    return format(top / bottom, spec) if bottom > 0 else "n/a"


async def main_async(args: argparse.Namespace) -> None:
    import numpy as np

    repeats = 1 if args.quick else args.repeats
    big_n = 2 if args.quick else 5
    small_n = 200 if args.quick else 5000
    rows = 100_000 if args.quick else 1_000_000
    big = 64 * MIB
    payloads: dict[str, Any] = {
        "64 MiB bytes": os.urandom(big),
        "64 MiB float64 ndarray": np.random.default_rng(1).random(big // 8),
        # Whole numbers as float64 (counts, ratings): lz4 keeps 37%, zstd 17%.
        "64 MiB compressible ndarray": np.round(np.random.default_rng(2).random(big // 8) * 100),
    }
    table = make_table(rows)
    table_bytes = table.nbytes
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(repeats):
        for name, system in SYSTEMS.items():
            if name == "anyio.to_process" and not _has("anyio"):
                continue
            if name in _CODEC_MODULES and not _has(_CODEC_MODULES[name]):
                continue
            tcp = name.startswith("corral-tcp")
            async with system() as call:
                for label, value in payloads.items():
                    if tcp and label not in TCP_PAYLOADS:
                        continue
                    if label == "64 MiB compressible ndarray" and not name.startswith("corral"):
                        continue
                    if name == "corral views" and label != "64 MiB bytes":
                        continue  # the same as "corral" for anything but bytes
                    n = 1 if tcp and args.quick else big_n
                    figures.setdefault((label, name), []).append(await round_trips(call, value, n))
                if tcp:
                    continue
                if name in ("corral", "ProcessPoolExecutor"):
                    label = f"Arrow table {rows:,} x 10"
                    figures.setdefault((label, name), []).append(
                        await round_trips(call, table, big_n)
                    )
                if name == "corral":
                    small_array = np.zeros(128)  # 1 KiB
                    small_bytes = bytes(1024)
                    figures.setdefault(("1 KiB ndarray", name), []).append(
                        await round_trips(call, small_array, small_n)
                    )
                    figures.setdefault(("1 KiB bytes", name), []).append(
                        await round_trips(call, small_bytes, small_n)
                    )

    sizes = {label: (table_bytes if label.startswith("Arrow") else big) for label, _ in figures}
    print(
        f"{'figure':<30} {'system':<22} {'wall ms':>9} {'GB/s':>6} {'CPU ms':>9} {'GB/s(CPU)':>9}"
    )
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for key, runs in figures.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        medians[key] = (wall, cpu)
        label, name = key
        size = sizes[label]
        rate = _rate(size, wall) if not label.startswith("1 KiB") else "     -"
        cpu_rate = _rate(size, cpu) if not label.startswith("1 KiB") else "     -"
        print(f"{label:<30} {name:<22} {wall * 1e3:9.3f} {rate:>6} {cpu * 1e3:9.3f} {cpu_rate:>9}")
    print()
    print(f"Arrow table: {table_bytes / MIB:.1f} MiB of buffers")
    array_label = "64 MiB float64 ndarray"
    compared = [
        (array_label, "corral"),
        (f"Arrow table {rows:,} x 10", "corral"),
        ("64 MiB bytes", "corral"),
        ("64 MiB bytes", "corral views"),
    ]
    for other in ("ProcessPoolExecutor", "anyio.to_process"):
        for label, ours in compared:
            if (label, other) in medians and (label, ours) in medians:
                w = _ratio(medians[(label, other)][0], medians[(label, ours)][0], ".1f")
                c = _ratio(medians[(label, other)][1], medians[(label, ours)][1], ".1f")
                print(f"{label}: {ours} is {w}x {other} (wall), {c}x (CPU)")
    for label in TCP_PAYLOADS:
        before = medians.get((label, "corral-tcp-inline"))
        for name in ("corral-tcp", "corral-tcp-lz4", "corral-tcp-zstd"):
            after = medians.get((label, name))
            if before is not None and after is not None:
                w = _ratio(before[0], after[0], ".2f")
                c = _ratio(before[1], after[1], ".2f")
                print(f"{label} over TCP: {name} is {w}x inline (wall), {c}x (CPU)")
    a, b = medians[("1 KiB ndarray", "corral")], medians[("1 KiB bytes", "corral")]
    print(
        f"1 KiB ndarray / 1 KiB bytes per call: {_ratio(a[0], b[0], '.2f')}x (wall), "
        f"{_ratio(a[1], b[1], '.2f')}x (CPU)"
    )
    bursts: list[tuple[str, Any, dict[str, Any]]] = [
        ("array", np.ones(4 * MIB // 8), {}),
        ("bytes (views)", os.urandom(4 * MIB), {"large_bytes": "memoryview"}),
    ]
    for what, value, options in bursts:
        named, used = await peak_shm(64, value, **options)
        print(
            f"64 concurrent 4 MiB {what} echoes, {WORKERS} workers: peak of corral's named "
            f"segments {named / MIB:.0f} MiB; peak /dev/shm growth {used / MIB:.0f} MiB "
            "(includes other programs' use)"
        )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.arrays", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat, small counts")
    parser.add_argument("--repeats", type=int, default=5, help="repeats (median is printed)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("numpy", "pyarrow"):
        if not _has(name):
            sys.exit(f"benchmarks.arrays needs {name}: pip install -e '.[bench]'")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
