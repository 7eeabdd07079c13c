"""The benchmark harness runs end to end (no timing is asserted here).

``python -m benchmarks.run`` (``nox -s bench``) is the comparison with other
libraries behind docs/performance.md; ``corral bench`` (tests/test_cli.py) is
the installed package's own, and does not use it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.timeout(240)
def test_quick_cost_tables_print_each_case_against_the_floor() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--cost"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert run.returncode == 0, run.stderr
    assert "CPU per sequential no-op call" in run.stdout
    assert re.search(r"^floor\s+[\d.]+ \(1.00x\)", run.stdout, re.M), run.stdout
    for case in ("sync-only app", "sync, mixed app", "async handler"):
        assert re.search(rf"^{re.escape(case)}\s+[\d.]+ \([\d.]+x\)", run.stdout, re.M), case
    assert "System calls per sequential call" in run.stdout or "strace is not installed" in (
        run.stdout
    )
    assert "Idle worker RSS" in run.stdout and "Cold start, pool of 4" in run.stdout


def test_without_strace_the_syscall_table_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import io

    from benchmarks.cost import QUICK, STRACE_MISSING, print_syscalls, syscall_table

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no strace on PATH
    table = syscall_table(QUICK)
    assert table is None
    out = io.StringIO()
    print_syscalls(table, QUICK.strace_calls, out)
    assert STRACE_MISSING in out.getvalue()
    assert "apt-get install -y strace" in out.getvalue()


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


def test_hot_path_benchmark_prints_each_side_against_the_floor() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.hot_path", "--calls", "200", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for side in ("parent", "worker, sync-only app", "worker, mixed app"):
        assert re.search(rf"^{re.escape(side)} +[\d.]+ us +[\d.]+ us .* [\d.]+x$", run.stdout, re.M)


def test_the_node_loss_run_explains_itself_and_refuses_a_bad_schedule() -> None:
    # The run itself needs a simulated Ray cluster and minutes: docs/scale-out.md
    # records one. Here: its options, and a clear one-line refusal.
    shown = subprocess.run(
        [sys.executable, "-m", "benchmarks.node_loss", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "--events" in shown.stdout, shown.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "benchmarks.node_loss", "--events", "8:explode"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert "'8:explode' is not SECONDS:remove or SECONDS:add" in refused.stderr


@pytest.mark.timeout(400)  # 64 MiB echoes, the TCP ones inline among them
def test_the_array_benchmark_prints_every_figure_and_ratio() -> None:
    pytest.importorskip("numpy")
    pytest.importorskip("pyarrow")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.arrays", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr
    for figure in ("64 MiB float64 ndarray", "Arrow table 100,000 x 10", "1 KiB ndarray"):
        assert figure in run.stdout
    assert "corral is" in run.stdout and "x ProcessPoolExecutor" in run.stdout
    assert "peak of corral's named segments" in run.stdout
    assert "64 MiB float64 ndarray over TCP: corral-tcp is" in run.stdout
    assert "corral views" in run.stdout and "4 MiB bytes (views) echoes" in run.stdout


def test_idle_memory_says_when_corral_runs_without_compiled_bytecode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that compiles corral at start keeps about 2 MiB more: the figure
    # would mislead without the note.
    import io

    from benchmarks import cost

    import corral

    package = tmp_path / "corral"
    (package / "worker").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "worker" / "_app.py").write_text("")
    monkeypatch.setattr(corral, "__file__", str(package / "__init__.py"))
    assert cost.uncompiled_modules() == ["__init__.py", "_app.py"]

    rss = {"bare interpreter": 8 * cost.MIB, "sync-only app": 13 * cost.MIB}
    out = io.StringIO()
    cost.print_memory(rss, {"floor": 100.0}, out)
    assert "sync-only app" in out.getvalue()
    assert "2 of corral's modules have no compiled bytecode" in out.getvalue()

    import compileall

    assert compileall.compile_dir(str(package), quiet=1, force=True)
    assert cost.uncompiled_modules() == []
    out = io.StringIO()
    cost.print_memory(rss, {"floor": 100.0}, out)
    assert "compiled bytecode" not in out.getvalue()


@pytest.mark.timeout(240)
def test_quick_throughput_table_prints_each_side_against_the_floor() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--throughput"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if line.strip()}
    assert {"floor", "corral", "mc=32"} <= set(rows)
    assert "(1.00x)" in rows["floor"]
    for name in ("corral", "mc=32"):
        # calls/s, parent CPU and workers' CPU, each with its ratio; then system calls
        assert len(re.findall(r"\((\d+\.\d\dx|  n/a)\)", rows[name])) == 3, rows[name]
        assert re.search(r"parent \d+\.\d\d\+\d+\.\d\d workers \d+\.\d\d\+\d+\.\d\d", rows[name])
