"""Suite-wide fixtures: every test must leave no child process and no open descriptor.

corral's promise is that closing a pool leaves nothing behind, so the whole suite
checks it, not just the tests written about it. ``_no_leaks`` (autouse) records,
before each test, the test process's recursive children (pid and create time, so
a reused pid is not mistaken for an old child) and its number of open file
descriptors. After the test it fails the test (as an error at teardown) if

- a child process that was not there before is still alive a few seconds later.
  Those processes are the test's own: they are SIGKILLed and reaped before the
  failure is reported, so one leaking test does not leave anything behind;
- the number of open descriptors grew. The message lists the descriptors that
  are new (or now point elsewhere), read from ``/proc/self/fd``;
- collecting the test's garbage raised ResourceWarnings or errors in
  finalizers: something (a file, a transport, a Popen) was left for the garbage
  collector to close.

Ordering: this fixture is a plain sync, function-scoped autouse fixture, so
pytest sets it up before the fixtures a test requests, including
pytest-asyncio's function-scoped runner (which is appended to each async test's
fixtures), and tears it down after them: the check runs once the test's event
loop is closed, so the loop's own selector and self-pipe descriptors are never
counted. Fixtures of a wider scope (module, session) are set up before the
baseline and torn down after the check, so what they own is not checked here.

Limits: a process that detaches from the test process's tree (double fork) is
not seen; on Linux only (``/proc``), which is all corral supports.

``@pytest.mark.allow_leaks`` turns the check off for a test that deliberately
manages processes or descriptors beyond its own end.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings
from collections.abc import Iterator

import psutil
import pytest

# How long a new child may take to finish exiting after the test before it counts
# as leaked (and how long to wait for it to be reaped once killed).
EXIT_GRACE = 3.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_leaks: do not fail this test for child processes or file descriptors "
        "it leaves behind (it manages them itself)",
    )


def _children(me: psutil.Process) -> dict[tuple[int, float], psutil.Process]:
    """The live recursive children of ``me``, keyed by (pid, create time)."""
    found: dict[tuple[int, float], psutil.Process] = {}
    for child in me.children(recursive=True):
        try:
            found[(child.pid, child.create_time())] = child
        except psutil.NoSuchProcess:
            continue
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        # The worker's bootstrap is a multi-line -c argument: keep each pid on one line.
        cmdline = " ".join(proc.cmdline()).replace("\n", "\\n") or f"[{proc.name()}]"
    except psutil.Error:
        cmdline = "<cmdline unavailable>"
    return f"pid {proc.pid}: {cmdline}"


def _fd_targets() -> dict[int, str]:
    """fd -> what it points at, for this process's open descriptors."""
    targets: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory's own descriptor, already closed
            continue
    return targets


def _check_processes(
    me: psutil.Process, baseline: dict[tuple[int, float], psutil.Process]
) -> list[str]:
    new = [proc for key, proc in _children(me).items() if key not in baseline]
    if not new:
        return []
    # Processes the test stopped may still be on their way out: wait for the OS
    # to report their end (this also reaps those that are our direct children).
    _, alive = psutil.wait_procs(new, timeout=EXIT_GRACE)
    if not alive:
        return []
    alive.sort(key=lambda proc: proc.pid)
    leaked = [_describe(proc) for proc in alive]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # checks the create time first: never a recycled pid
    psutil.wait_procs(alive, timeout=EXIT_GRACE)
    return [
        f"{len(leaked)} child process(es) still running after the test (now killed):",
        *(f"  leaked {line}" for line in leaked),
    ]


def _collect_garbage() -> list[str]:
    """gc.collect(), returning what finalizers complained about while it ran.

    That is ResourceWarnings (an unclosed file, transport or Popen) and errors
    raised in ``__del__`` (a transport finalized after its loop was closed).
    Caught here so that they are reported against this test, instead of surfacing
    as unraisable exceptions wherever the collector happens to run next.
    """
    complaints: list[str] = []

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        where = unraisable.err_msg or "Exception ignored in"
        complaints.append(f"{where}: {unraisable.object!r}: {unraisable.exc_value!r}")

    previous_hook = sys.unraisablehook
    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
    finally:
        sys.unraisablehook = previous_hook
    for warning in caught:
        if issubclass(warning.category, ResourceWarning):
            complaints.append(str(warning.message))
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return complaints


def _check_fds(me: psutil.Process, count_before: int, targets_before: dict[int, str]) -> list[str]:
    # Anything unreachable that still holds a descriptor closes it now; what it
    # says while doing so (it was never closed) is a leak too.
    problems: list[str] = []
    unclosed = _collect_garbage()
    if unclosed:
        problems.append(
            f"{len(unclosed)} complaint(s) from finalizers run by the garbage collector "
            "(resources the test never closed):"
        )
        problems += [f"  {message}" for message in unclosed]
    count_after = me.num_fds()
    if count_after <= count_before:
        return problems
    targets_after = _fd_targets()
    new = {
        fd: target
        for fd, target in sorted(targets_after.items())
        if targets_before.get(fd) != target
    }
    return [
        *problems,
        f"open file descriptors grew from {count_before} to {count_after}:",
        *(f"  leaked fd {fd} -> {target}" for fd, target in new.items()),
    ]


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("allow_leaks") is not None:
        yield
        return
    me = psutil.Process()
    gc.collect()
    children_before = _children(me)
    fds_before = me.num_fds()
    targets_before = _fd_targets()
    yield
    problems = _check_processes(me, children_before)
    problems += _check_fds(me, fds_before, targets_before)
    if problems:
        pytest.fail(
            "test left resources behind (mark it allow_leaks if that is on purpose):\n"
            + "\n".join(problems),
            pytrace=False,
        )
