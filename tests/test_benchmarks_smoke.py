"""The benchmark harness runs end to end (no timing is asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_table_with_ratios() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
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
