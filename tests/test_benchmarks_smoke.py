"""The benchmark harness runs end to end, through ``corral bench`` (no timing is asserted here).

``corral bench`` runs the same harness as ``python -m benchmarks.run``, with a
progress bar over the figures on stderr.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_table_with_ratios() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral._cli",
            "bench",
            "--quick",
            "--systems",
            "corral",
            "ProcessPoolExecutor",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    for row in ("latency p50", "no-op calls/s", "1 ms CPU tasks/s", "echo 1 MiB"):
        assert row in run.stdout
    assert "(1.00x)" in run.stdout  # the floor's own column
    assert "corral session calls / plain calls" in run.stdout
    # floor, corral and ProcessPoolExecutor: 6 figures each, and corral's 6 extras.
    assert re.search(r"done .* 24/24 figures", run.stderr), run.stderr


def test_the_harness_still_runs_as_a_module() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "--quick" in run.stdout and "--systems" in run.stdout


def test_preload_benchmark_prints_both_modes() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.preload",
            "--rounds",
            "1",
            "--import-seconds",
            "0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for mode in ("plain", "preload"):
        assert f"{mode:8} launch to first result: median" in run.stdout


def test_threshold_sweep_prints_pipes_against_shared_memory() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--sweep"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    assert "/dev/shm (MiB/s)" in run.stdout
    for size in ("16 KiB", "1024 KiB", "4096 KiB"):
        assert size in run.stdout


def test_every_system_is_an_async_context_manager() -> None:
    # --quick runs only some systems: a factory the smoke run skips must still
    # give what measure() enters (creating it starts nothing).
    from benchmarks.run import SYSTEMS, _available

    for name, factory in SYSTEMS.items():
        if not _available(name):
            continue
        system = factory()
        assert hasattr(system, "__aenter__") and hasattr(system, "__aexit__"), name


def test_routing_benchmark_prints_the_overhead_of_the_front() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.routing", "--calls", "200", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "stand-in pool (the front's own cost): direct median" in run.stdout
    assert "front+rule overhead: median" in run.stdout
