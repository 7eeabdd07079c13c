"""The ``corral`` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
import time

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
