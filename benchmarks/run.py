"""Benchmark corral against the floor and the usual alternatives, in one run.

    python -m benchmarks.run            # full run: medians of 5 repeats
    python -m benchmarks.run --quick    # smoke test: small counts, 1 repeat
    python -m benchmarks.run --sweep    # echo by size, pipes against /dev/shm
    python -m benchmarks.run --placed   # also workers over TCP and on a local Ray
    python -m benchmarks.run --cost     # only what one call costs (benchmarks/cost.py)
    python -m benchmarks.run --throughput   # only CPU per call under load

Every system runs the same task functions (benchmarks/tasks.py) with 2 worker
processes. Figures are printed with their ratio to the floor (benchmarks/floor.py)
measured in the same run: ratios hold on a noisy machine, absolute times do not.
The ``corral`` column uses default settings, where buffers over
``large_buffer_threshold`` (256 KiB) travel through /dev/shm; ``corral-pipes``
turns that path off, so its echo rows are the pipes alone.
Sequential latency is measured with this process and its workers pinned to one
CPU (children inherit the affinity), which makes runs comparable here; the
throughput figures use every CPU. After the table come the cost tables of
benchmarks/cost.py (CPU and system calls per call on each side, idle memory,
cold start) and of benchmarks/throughput.py (CPU and system calls per call
on each side with 64 callers in flight), unless ``--systems`` picks some
systems only. ``corral tcp`` and
``corral ray`` are corral with workers that connect back over TCP (loopback):
started by a local shim, and placed by a local Ray instance (``RayLauncher``,
when Ray is installed); they are measured only with ``--placed`` (or named in
``--systems``), so a plain run starts no Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from benchmarks import cost, tasks
from benchmarks import throughput as under_load
from benchmarks.floor import FloorPool
from corral._bench_floor import settle_malloc

WORKERS = 2
MIB = 1024 * 1024

Call = Callable[..., Awaitable[Any]]


@dataclass
class Counts:
    latency_calls: int
    throughput_calls: int
    cpu_calls: int
    echo_calls: int
    repeats: int


FULL = Counts(latency_calls=3000, throughput_calls=30000, cpu_calls=2000, echo_calls=40, repeats=5)
QUICK = Counts(latency_calls=200, throughput_calls=2000, cpu_calls=100, echo_calls=4, repeats=1)
BIG_ECHOES = 3  # round trips of the 64 MiB payload (1 with --quick)
FIGURES_PER_REPEAT = 6  # figures measure() takes per repeat
EXTRA_FIGURES_PER_REPEAT = 6  # figures corral_extras() takes per repeat


class Progress(Protocol):
    """Told how many figures a run will take, then of each one as it is taken."""

    def planned(self, figures: int) -> None: ...

    def measured(self, system: str, figure: str) -> None: ...


class _NoProgress:
    def planned(self, figures: int) -> None:
        return None

    def measured(self, system: str, figure: str) -> None:
        return None


NO_PROGRESS: Progress = _NoProgress()


# --- systems: each yields an async call(method, *args) -------------------------


@contextlib.asynccontextmanager
async def floor_system() -> AsyncIterator[Call]:
    async with FloorPool(WORKERS) as pool:
        yield pool.call


@contextlib.asynccontextmanager
async def corral_system(session: bool = False) -> AsyncIterator[Call]:
    """corral with default settings: buffers over 256 KiB go through /dev/shm."""
    import corral

    async with corral.Pool("benchmarks.corral_app:app", size=WORKERS) as pool:
        yield pool.call


@contextlib.asynccontextmanager
async def _corral_placed(launcher: Any) -> AsyncIterator[Call]:
    """corral with workers that connect back over TCP (loopback here).

    Their processes are not children of this one, so they are given this
    process's CPU affinity by hand, as local workers inherit it.
    """
    import corral

    async with corral.Pool("benchmarks.corral_app:app", size=WORKERS, launcher=launcher) as pool:
        for worker in pool.workers:
            if worker.pid is not None:
                os.sched_setaffinity(worker.pid, os.sched_getaffinity(0))
        yield pool.call


def corral_tcp_system() -> contextlib.AbstractAsyncContextManager[Call]:
    from corral._launch._socket_launcher import SubprocessShimLauncher

    return _corral_placed(SubprocessShimLauncher())


def corral_ray_system() -> contextlib.AbstractAsyncContextManager[Call]:
    from corral.ray import RayLauncher

    return _corral_placed(RayLauncher(host="127.0.0.1", num_cpus=1))


@contextlib.asynccontextmanager
async def corral_pipes_system() -> AsyncIterator[Call]:
    """corral with the large-buffer path off: every byte goes through the pipes."""
    import corral

    async with corral.Pool(
        "benchmarks.corral_app:app", size=WORKERS, large_buffer_threshold=None
    ) as pool:
        yield pool.call


@contextlib.asynccontextmanager
async def executor_system() -> AsyncIterator[Call]:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(WORKERS) as executor:
        await asyncio.gather(*(loop.run_in_executor(executor, tasks.noop) for _ in range(WORKERS)))

        async def call(method: str, *args: Any) -> Any:
            return await loop.run_in_executor(executor, tasks.TASKS[method], *args)

        yield call


@contextlib.asynccontextmanager
async def anyio_system() -> AsyncIterator[Call]:
    import anyio
    import anyio.to_process

    limiter = anyio.CapacityLimiter(WORKERS)

    async def call(method: str, *args: Any) -> Any:
        return await anyio.to_process.run_sync(tasks.TASKS[method], *args, limiter=limiter)

    await asyncio.gather(*(call("noop") for _ in range(WORKERS)))
    yield call


@contextlib.asynccontextmanager
async def pebble_system() -> AsyncIterator[Call]:
    import pebble

    pool = pebble.ProcessPool(max_workers=WORKERS)
    try:

        async def call(method: str, *args: Any) -> Any:
            return await asyncio.wrap_future(pool.schedule(tasks.TASKS[method], args))

        await asyncio.gather(*(call("noop") for _ in range(WORKERS)))
        yield call
    finally:
        pool.close()
        pool.join()


# --- figures ---------------------------------------------------------------------


async def sequential_latency(call: Call, n: int) -> tuple[float, float]:
    for _ in range(min(200, n)):
        await call("noop")
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        started = clock()
        await call("noop")
        samples.append(clock() - started)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


async def throughput(call: Call, method: str, n: int, in_flight: int = 64, *args: Any) -> float:
    remaining = n

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(method, *args)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return n / (time.perf_counter() - started)


async def echo_rate(call: Call, size: int, n: int) -> float:
    payload = os.urandom(size)
    await call("echo", payload)
    started = time.perf_counter()
    for _ in range(n):
        result = await call("echo", payload)
        assert len(result) == size
    return size * n / MIB / (time.perf_counter() - started)


def _pin(cpus: set[int] | None) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus or set(range(os.cpu_count() or 1)))


SYSTEMS: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Call]]] = {
    "floor": floor_system,
    "corral": corral_system,
    "corral tcp": corral_tcp_system,
    "corral ray": corral_ray_system,
    "corral-pipes": corral_pipes_system,
    "ProcessPoolExecutor": executor_system,
    "anyio.to_process": anyio_system,
    "pebble": pebble_system,
}


async def measure(name: str, counts: Counts, progress: Progress = NO_PROGRESS) -> dict[str, float]:
    factory = SYSTEMS[name]
    figures: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        figures.setdefault(key, []).append(value)
        progress.measured(name, key)

    for _ in range(counts.repeats):
        _pin({0})
        async with factory() as call:
            p50, p99 = await sequential_latency(call, counts.latency_calls)
        add("latency p50 (µs)", p50 * 1e6)
        add("latency p99 (µs)", p99 * 1e6)
        _pin(None)
        async with factory() as call:
            add(
                "no-op calls/s, 64 in flight",
                await throughput(call, "noop", counts.throughput_calls),
            )
            add(
                "1 ms CPU tasks/s, 64 in flight",
                await throughput(call, "cpu_1ms", counts.cpu_calls),
            )
            add("echo 1 MiB (MiB/s)", await echo_rate(call, MIB, counts.echo_calls))
            big = 1 if counts is QUICK else BIG_ECHOES
            add("echo 64 MiB (MiB/s)", await echo_rate(call, 64 * MIB, big))
    return {key: statistics.median(values) for key, values in figures.items()}


async def placed_latency_ratios(names: list[str], counts: Counts) -> dict[str, float]:
    """Latency p50 of placed workers over local ones, measured in alternation.

    Each round measures the local launcher and each placed one back to back,
    so that a change in the machine's load hits both sides of a ratio alike;
    the figure is the median of the rounds' ratios.
    """
    placed = [name for name in ("corral tcp", "corral ray") if name in names]
    ratios: dict[str, list[float]] = {name: [] for name in placed}
    for _ in range(counts.repeats):
        _pin({0})
        local = None
        for name in ["corral", *placed]:
            async with SYSTEMS[name]() as call:
                p50, _ = await sequential_latency(call, counts.latency_calls)
            if local is None:
                local = p50
            else:
                ratios[name].append(p50 / local)
        _pin(None)
    return {name: statistics.median(values) for name, values in ratios.items()}


async def corral_extras(counts: Counts, progress: Progress = NO_PROGRESS) -> dict[str, float]:
    """Figures only corral has: sessions versus plain calls, cold start."""
    import corral

    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)
        progress.measured("corral", key)

    for _ in range(counts.repeats):
        async with corral.Pool("benchmarks.corral_app:app", size=WORKERS) as pool:
            plain = await throughput(pool.call, "session_noop", counts.throughput_calls)
            session_ids = iter(range(10**9))

            async def session_call(
                method: str, *args: Any, pool: corral.Pool = pool, ids: Any = session_ids
            ) -> Any:
                return await pool.call(method, *args, session=f"s{next(ids) % 64}")

            with_sessions = await throughput(session_call, "session_noop", counts.throughput_calls)
        add("session calls / plain calls", with_sessions / plain)
        async with corral.Pool("benchmarks.corral_app:app", size=WORKERS) as pool:
            victim = pool.workers[0]
            assert victim.pid is not None
            killed = time.perf_counter()
            os.kill(victim.pid, signal.SIGKILL)
            await pool._wait_until(lambda v=victim: v.state.value == "dead", 10)
            await pool.wait_ready(timeout=30)
            add("crashed worker to full capacity (ms)", (time.perf_counter() - killed) * 1000)
            rss = [w.sample_rss() or 0 for w in pool.workers]
            launched = pool.workers[0]._launched
            shepherd = cost.rss_of(launched.pid) if launched else 0
        bare = await cost.bare_interpreter_rss()
        add("idle worker RSS / bare interpreter RSS", statistics.mean(rss) / bare)
        add("idle worker RSS (MiB)", statistics.mean(rss) / MIB)
        add("shepherd RSS (MiB)", shepherd / MIB)
        started = time.perf_counter()
        async with corral.Pool("benchmarks.corral_app:app", size=4) as pool:
            await asyncio.gather(*(pool.call("noop") for _ in range(4)))
            add("cold start, pool of 4 (ms)", (time.perf_counter() - started) * 1000)
    return {key: statistics.median(values) for key, values in results.items()}


SWEEP_KIB = (16, 64, 128, 256, 512, 1024, 4096)


async def threshold_sweep(counts: Counts) -> None:
    """Echo rate by payload size, pipes against /dev/shm: where the threshold belongs."""
    import corral

    rates: dict[tuple[int, bool], list[float]] = {}
    for _ in range(counts.repeats):
        for shm in (False, True):
            # threshold 1 byte: every payload measured here goes out of band
            async with corral.Pool(
                "benchmarks.corral_app:app", size=WORKERS, large_buffer_threshold=1 if shm else None
            ) as pool:
                for kib in SWEEP_KIB:
                    n = max(4, (32 * MIB) // (kib * 1024) // (4 if counts is QUICK else 1))
                    rate = await echo_rate(pool.call, kib * 1024, n)
                    rates.setdefault((kib, shm), []).append(rate)
    sys.stdout.write(
        f"{'echo size':>10}{'pipes (MiB/s)':>16}{'/dev/shm (MiB/s)':>18}{'ratio':>8}\n"
    )
    for kib in SWEEP_KIB:
        pipes = statistics.median(rates[(kib, False)])
        shm_rate = statistics.median(rates[(kib, True)])
        sys.stdout.write(
            f"{kib:>6} KiB{_format(pipes):>16}{_format(shm_rate):>18}{shm_rate / pipes:>7.2f}x\n"
        )


def _format(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def print_table(results: dict[str, dict[str, float]], out: Any = sys.stdout) -> None:
    systems = list(results)
    keys = list(results["floor"])
    floor = results["floor"]
    head = f"{'figure':<32}" + "".join(f"{s:>24}" for s in systems)
    out.write(head + "\n" + "-" * len(head) + "\n")
    for key in keys:
        row = f"{key:<32}"
        for system in systems:
            value = results[system].get(key)
            if value is None:
                row += f"{'-':>24}"
                continue
            ratio = value / floor[key] if floor.get(key) else float("nan")
            row += f"{_format(value) + f' ({ratio:.2f}x)':>24}"
        out.write(row + "\n")


_NEEDS = {"anyio.to_process": "anyio", "pebble": "pebble", "corral ray": "ray"}
_EXTRAS = {"corral ray": "ray"}


def _available(name: str) -> bool:
    import importlib.util

    module = _NEEDS.get(name)
    if module is None or importlib.util.find_spec(module) is not None:
        return True
    extra = _EXTRAS.get(name, "bench")
    sys.stderr.write(f"skipping {name}: {module} is not installed (pip install -e '.[{extra}]')\n")
    return False


PLACED = ("corral tcp", "corral ray")


def selected_systems(args: argparse.Namespace) -> list[str]:
    """The systems to measure: those --systems names, else all but the placed ones
    (workers over TCP and on a local Ray), which --placed adds."""
    if args.systems:
        return [n for n in SYSTEMS if n in args.systems]
    return [n for n in SYSTEMS if args.placed or n not in PLACED]


def planned_figures(names: list[str], counts: Counts) -> int:
    """How many figures a run of these systems takes (what a progress bar counts)."""
    figures = len(names) * counts.repeats * FIGURES_PER_REPEAT
    if "corral" in names:
        figures += counts.repeats * EXTRA_FIGURES_PER_REPEAT
    return figures


async def main_async(args: argparse.Namespace, progress: Progress = NO_PROGRESS) -> None:
    """Measure the systems ``args`` names and print the table (``corral bench`` runs this)."""
    counts = QUICK if args.quick else FULL
    if args.sweep:
        sys.stderr.write("measuring echo by size, pipes against /dev/shm ...\n")
        await threshold_sweep(counts)
        return
    if args.cost:
        await cost.main_async(args.quick)
        return
    if args.throughput:
        await _throughput_table(args)
        return
    names = selected_systems(args)
    names = [n for n in names if _available(n)]
    if "floor" not in names:
        names.insert(0, "floor")
    progress.planned(planned_figures(names, counts))
    results: dict[str, dict[str, float]] = {}
    ray_started = False
    if "corral ray" in names:
        # One local Ray for the run, started before any pinning: its own
        # processes must not share the one CPU the latency figures use.
        import ray

        if not ray.is_initialized():
            sys.stderr.write("starting a local Ray instance ...\n")
            ray.init(
                address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False
            )
            ray_started = True
    paired: dict[str, float] = {}
    try:
        for name in names:
            sys.stderr.write(f"measuring {name} ...\n")
            results[name] = await measure(name, counts, progress)
        if "corral" in names and ({"corral tcp", "corral ray"} & set(names)):
            sys.stderr.write("measuring placed against local workers, in alternation ...\n")
            paired = await placed_latency_ratios(names, counts)
    finally:
        if ray_started:
            ray.shutdown()
    if "corral" in names:
        sys.stderr.write("measuring corral sessions and cold start ...\n")
        extras = await corral_extras(counts, progress)
        sys.stdout.write("\n")
    print_table(results)
    if "corral" in names:
        for key, value in extras.items():
            sys.stdout.write(f"corral {key}: {_format(value)}\n")
        if extras and (missing := cost.uncompiled_modules()):
            sys.stdout.write(
                f"(idle RSS: {len(missing)} of corral's modules have no compiled bytecode, "
                "which each worker compiles and keeps about 2 MiB more for)\n"
            )
        key = "latency p50 (µs)"
        for placed in ("corral tcp", "corral ray"):
            if placed in results:
                ratio = results[placed][key] / results["corral"][key]
                sys.stdout.write(f"{placed} / corral local, latency p50: {ratio:.2f}x")
                if placed in paired:
                    sys.stdout.write(f" (in alternation: {paired[placed]:.2f}x)")
                sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.systems:  # the whole benchmark: the cost tables too
        await cost.main_async(args.quick)
        await _throughput_table(args)


async def _throughput_table(args: argparse.Namespace) -> None:
    """benchmarks/throughput.py: each side's CPU per call with 64 callers in flight."""
    argv = ["--calls", "2000", "--rounds", "1"] if args.quick else []
    argv += ["--max-concurrency", "32"] + (["--uvloop"] if args.uvloop else [])
    sys.stdout.write(
        "\nCPU per call, 64 callers in flight over 2 workers (benchmarks/throughput.py)\n"
    )
    sys.stdout.flush()
    await asyncio.to_thread(under_load.main, argv)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The harness's options, shared by ``python -m benchmarks.run`` and ``corral bench``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one repeat")
    parser.add_argument("--uvloop", action="store_true", help="run the parent on uvloop")
    parser.add_argument("--systems", nargs="*", help=f"subset of {list(SYSTEMS)}")
    parser.add_argument(
        "--placed",
        action="store_true",
        help="also measure placed workers: over TCP (a local shim) and on a local Ray "
        "(started for the run, when Ray is installed)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="only corral's echo rate by size, pipes against /dev/shm (large_buffer_threshold)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="only the cost tables: CPU and system calls per call on each side, memory, cold start",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="only CPU and system calls per call on each side with 64 callers in flight",
    )
    return parser


def run(args: argparse.Namespace, progress: Progress = NO_PROGRESS) -> None:
    """Run the benchmark table on a fresh event loop (uvloop with ``--uvloop``)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    settle_malloc()  # else the floor's first repeat maps memory on every read
    if args.uvloop:
        import uvloop

        uvloop.run(main_async(args, progress))
    else:
        asyncio.run(main_async(args, progress))


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
