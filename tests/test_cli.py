"""The ``corral`` command line, run as a user runs it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests._serve import serve_in_thread, status_demo_app

import corral


def test_corral_demo_runs_the_mixed_workload_and_ends_by_itself() -> None:
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "corral._cli", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 30
    out = run.stdout
    for expected in (
        "plain calls",
        "sessions",
        "streamed reply",
        "WorkerCrashed",
        "back to 2 ready workers",
        "CallTimeout",
        "latency p99",
        "workers restarted",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_corral_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "corral._cli", "version"], capture_output=True, text=True, timeout=30
    )
    assert run.stdout.strip() == f"corral {corral.__version__}"


def _corral(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral._cli", *args], capture_output=True, text=True, timeout=60
    )


def test_corral_call_prints_the_result_as_json() -> None:
    run = _corral("call", "tests.workers.basic:app", "add", "2", "40")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "42"
    run = _corral("call", "tests.workers.basic:app", "echo", "not json")
    assert run.stdout.strip() == '"not json"'


def test_corral_call_reports_a_typed_error() -> None:
    run = _corral("call", "tests.workers.basic:app", "fail", "boom")
    assert run.returncode == 1
    assert run.stderr.startswith("RemoteError: ValueError: boom")


def test_corral_top_shows_a_live_pool_of_the_demo_worker_and_a_replaced_worker() -> None:
    run = _corral("top", "--size", "2", "--duration", "6", "--crash-every", "3")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "corral pool1  open  corral._demo_app:app" in out
    lines = out.splitlines()
    workers = [line.split() for line in lines if line.strip().startswith("pool1-w")]
    evicted = [line.split() for line in lines if " died " in line]
    assert len(workers) == 2, out
    assert any(int(row[5].replace(",", "")) > 0 for row in workers if row[2] != "starting"), out
    # The demo load killed a worker after 1 s (a third of --crash-every): it was replaced.
    assert evicted and evicted[0][-2:] == ["signal", "SIGKILL"], out
    assert {row[0] for row in workers}.isdisjoint({row[3] for row in evicted}), out


def test_corral_top_reads_a_running_service_s_status_page() -> None:
    with serve_in_thread(status_demo_app(size=2)) as base:
        pids = [w["pid"] for w in httpx.get(f"{base}/corral/status.json").json()["workers"]]
        run = _corral("top", "--url", f"{base}/corral", "--duration", "1.5", "--interval", "0.5")
    assert run.returncode == 0, run.stderr
    assert "corral demo  open  corral._demo_app:app" in run.stdout
    for worker_id, pid in zip(("demo-w1", "demo-w2"), pids, strict=True):
        assert re.search(rf"{worker_id}\s+{pid}\s+(ready|busy)", run.stdout), run.stdout


def test_corral_top_says_when_it_cannot_reach_the_service() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port nobody listens on
        port = unused.getsockname()[1]
        run = _corral("top", "--url", f"http://127.0.0.1:{port}/corral", "--duration", "1")
    assert run.returncode == 1
    assert run.stderr.startswith(
        f"corral top: cannot read http://127.0.0.1:{port}/corral/status.json"
    )


def test_corral_top_takes_a_target_or_a_url_not_both() -> None:
    run = _corral("top", "tests.workers.basic:app", "--url", "http://127.0.0.1:1/")
    assert run.returncode == 2
    assert "not both" in run.stderr


def test_corral_bench_measures_the_installed_package_anywhere(tmp_path: Path) -> None:
    """``corral bench`` needs no source checkout: it runs from any directory."""
    run = subprocess.run(
        [sys.executable, "-m", "corral._cli", "bench", "--quick"],
        cwd=tmp_path,  # no benchmarks/ folder here or above
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("floor ") for line in lines), run.stdout
    assert any(line.startswith("corral ") for line in lines), run.stdout
    ratios = [line for line in lines if line.startswith("corral/floor")]
    assert ratios and ratios[0].count("x") == 4, run.stdout  # four ratios to the floor


def test_the_installed_package_never_reaches_into_the_repository_benchmarks() -> None:
    package = Path(corral.__file__).parent
    for path in package.rglob("*.py"):
        source = path.read_text()
        assert "import benchmarks" not in source and "from benchmarks" not in source, path
        assert '"benchmarks"' not in source, path


def test_without_rich_the_library_works_and_top_says_what_to_install() -> None:
    # rich made unimportable: corral imports it only in ``top`` and ``bench``.
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "import corral, corral.asgi, corral.worker\n"
        "from corral._cli import main\n"
        "assert main(['call', 'tests.workers.basic:app', 'add', '1', '2']) == 0\n"
        "sys.exit(main(['top', '--duration', '1']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stdout.strip() == "3"
    assert "pip install 'corral[cli]'" in run.stderr
