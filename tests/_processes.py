"""Process bookkeeping shared by the tests that run Ray: what corral and Ray left running.

Ray starts and stops processes of its own while tests run, so those modules
check leaks by pid instead of with the suite's per-test check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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
