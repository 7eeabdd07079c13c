"""Process bookkeeping shared by tests: what corral and Ray left running, and parent programs.

Ray starts and stops processes of its own while tests run, so those modules
check leaks by pid instead of with the suite's per-test check. The tests that
kill a pool's parent run it as a program of its own (``parent_program``) and
look for what survived it (``still_running``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import psutil


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def corral_processes() -> list[psutil.Process]:
    """This process's descendants that are corral workers or shepherds."""
    found = []
    for proc in descendants():
        try:
            command = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "corral.worker" in command or "_shepherd.py" in command:
            found.append(proc)
    return found


def assert_no_corral_process_left() -> None:
    """Every corral worker and shepherd is gone (within 10 s); survivors are killed, then fail."""
    _, alive = psutil.wait_procs(corral_processes(), timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, f"corral processes outlived their pool: {alive}"


@contextlib.contextmanager
def reaping_what_starts(shutdown: Callable[[], None], what: str) -> Iterator[None]:
    """Run the block; then ``shutdown()`` and require every process started meanwhile gone.

    What is still running 30 s after ``shutdown()`` is killed (only those pids,
    which this block started) and fails the test as ``left running after {what}``.
    """
    before = {p.pid for p in descendants()}
    try:
        yield
    finally:
        started = [p for p in descendants() if p.pid not in before]
        shutdown()
        _, alive = psutil.wait_procs(started, timeout=30)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        assert not alive, f"left running after {what}: {alive}"


ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def parent_program(source: str, *args: str, reports: str) -> Iterator[tuple[Popen[str], Any]]:
    """Run ``source`` as a pool's parent process; yield it and the JSON line it reports.

    The program prints one JSON line starting with ``reports`` once its pool is
    up (structlog's own lines may come first). Whatever the test does to it
    (SIGSTOP, SIGKILL), it is killed and reaped at the end.
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", source, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert parent.stdout is not None
        for line in parent.stdout:
            if line.startswith(reports):
                break
        else:
            raise AssertionError("the parent program ended before it reported")
        yield parent, json.loads(line)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout:
            parent.stdout.close()


def still_running(pids: list[int], timeout: float) -> list[psutil.Process]:
    """Those of ``pids`` still running (zombies aside) after waiting up to ``timeout`` s."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
