"""pytest plugin for code that uses corral: the ``corral_pool`` fixture and a leak check.

Installing corral registers this module with pytest (the ``pytest11`` entry
point ``corral``); nothing else imports it, and ``corral`` itself never needs
pytest, pytest-asyncio or psutil.

Owns:

- ``corral_pool``: an async factory fixture. ``pool = await corral_pool(target,
  size=2, **options)`` starts a Pool and returns it; at teardown every pool it
  made is closed, in reverse order of creation, whether the test passed or not.
  It is declared with ``pytest_asyncio.fixture``, so it works in pytest-asyncio's
  strict mode as well as in auto mode. Without pytest-asyncio the fixture is
  still defined, and using it fails with a usage error that says so.
- the ``corral_no_leaks`` marker and the ``corral_leak_check`` ini option (bool,
  default false: every test). A test checked this way fails, as an error at
  teardown, if it leaves behind a child process of the test process (which is
  then SIGKILLed and reaped), more open file descriptors than it started with,
  or resources that only the garbage collector closed (ResourceWarnings,
  errors from finalizers). ``@pytest.mark.corral_no_leaks(False)`` exempts one
  test when the ini option is on. The check needs psutil; without it, asking
  for the check is a usage error naming psutil.

Must not touch: anything but fixtures, that marker and that ini option. No hook
changes collection, reporting or the event loop, and nothing runs for a test
that neither uses the fixture nor asks for the check, beyond looking up the
marker and the ini option. The one hook beyond registration,
``pytest_sessionfinish``, only unfreezes the heap the check froze.

How the leak check works: ``_corral_leak_check`` is a plain sync,
function-scoped autouse fixture. pytest sets it up before the fixtures a test
requests, including pytest-asyncio's function-scoped loop runner and
``corral_pool``, and tears it down after them: the check runs once the test's
pools are closed and its event loop is closed, so the loop's own selector and
self-pipe descriptors are never counted. Before the test it records the test
process's recursive children (pid and create time, so a reused pid is not
mistaken for an old child) and its open descriptors (``/proc/self/fd``). After
the test:

- a child process that was not there before and is still alive
  ``EXIT_GRACE`` seconds later is reported by pid and command line, then
  SIGKILLed and reaped, so one leaking test leaves nothing to the next;
- if the number of open descriptors grew, the descriptors that are new (or now
  point elsewhere) are listed with their targets;
- ``gc.collect()`` runs with ResourceWarnings recorded and the unraisable hook
  replaced, so a file, transport or Popen left for the collector to close is
  reported against this test rather than wherever the collector runs next.

Before the test the check collects garbage once and then sets aside every
object still alive (``gc.freeze()``), so the collection after the test looks
only at what the test made: it costs the same in a session whose heap holds
millions of objects (a full collection of the suite's heap took 40 ms, twice
per test). What a test leaves in a cycle after its end is still collected by
the next test's first collection; the heap is given back to the collector
(``gc.unfreeze()``) when the session ends.

Fixtures of a wider scope (module, session) are set up before the baseline and
torn down after the check, so what they own is not checked. A process that
detaches from the test process's tree (double fork) is not seen. Linux only
(``/proc``), which is all corral supports.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import pytest

from ._pool import Pool

try:
    import psutil  # type: ignore[import-untyped, unused-ignore]
except ImportError:
    _HAVE_PSUTIL = False
else:
    _HAVE_PSUTIL = True

try:
    import pytest_asyncio
except ImportError:
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True

__all__ = ["EXIT_GRACE", "PoolFactory"]

MARKER = "corral_no_leaks"
INI_OPTION = "corral_leak_check"

EXIT_GRACE = 3.0
"""Seconds a new child may take to finish exiting after the test before it counts
as leaked (and how long to wait for it to be reaped once killed)."""


# --- registration -------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI_OPTION,
        type="bool",
        default=False,
        help=f"apply corral's leak check ({MARKER}) to every test: no child process "
        "and no file descriptor may outlive the test",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(enabled=True): fail the test if, once it and its event loop are done, "
        "it left a child process running (killed, then reported by pid and command "
        "line) or more file descriptors open than before; corral_no_leaks(False) "
        f"exempts a test when the {INI_OPTION} ini option is on",
    )
    if config.getini(INI_OPTION) and not _HAVE_PSUTIL:
        raise pytest.UsageError(_psutil_missing(f"the {INI_OPTION} ini option"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    # The leak check set the heap aside test after test: give it back to the collector.
    gc.unfreeze()


# --- corral_pool --------------------------------------------------------------------


class PoolFactory(Protocol):
    """The ``corral_pool`` fixture: ``await corral_pool(target, size=2, **options)``.

    Takes the arguments of ``Pool`` (``size``, ``config``, ``name`` and the
    PoolConfig options), starts the pool and returns it.
    """

    async def __call__(self, target: str, /, **options: Any) -> Pool: ...


async def _close_all(pools: list[Pool]) -> None:
    """Close ``pools`` newest first; every one is closed even if an earlier close fails."""
    errors: list[Exception] = []
    for pool in reversed(pools):
        try:
            await pool.aclose()
        except Exception as exc:  # noqa: BLE001 - the others must still be closed
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup("closing the corral_pool pools failed", errors)


if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture(name="corral_pool")
    async def _corral_pool() -> AsyncIterator[PoolFactory]:
        """Start corral Pools for this test: ``pool = await corral_pool("pkg.mod:app", size=2)``.

        Every pool made here is closed at teardown, newest first, whether the
        test passed or failed.
        """
        pools: list[Pool] = []

        async def make(target: str, /, **options: Any) -> Pool:
            pool = Pool(target, **options)
            pools.append(pool)  # closing a pool that failed to start is a no-op
            await pool.start()
            return pool

        try:
            yield make
        finally:
            await _close_all(pools)

else:

    @pytest.fixture(name="corral_pool")
    def _corral_pool_unavailable() -> PoolFactory:
        """Stands in for ``corral_pool`` when pytest-asyncio is not installed."""
        raise pytest.UsageError(
            "the corral_pool fixture needs pytest-asyncio, which is not installed: "
            "pip install pytest-asyncio"
        )


# --- the leak check -----------------------------------------------------------------


def _psutil_missing(what: str) -> str:
    return f"{what} (corral's leak check) needs psutil, which is not installed: pip install psutil"


def _children(me: Any) -> dict[tuple[int, float], Any]:
    """The live recursive children of ``me``, keyed by (pid, create time)."""
    found: dict[tuple[int, float], Any] = {}
    for child in me.children(recursive=True):
        try:
            found[(child.pid, child.create_time())] = child
        except psutil.NoSuchProcess:
            continue
    return found


def _describe(proc: Any) -> str:
    try:
        # corral's worker bootstrap is a multi-line -c argument: keep each pid on one line.
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


def _check_processes(me: Any, baseline: dict[tuple[int, float], Any]) -> list[str]:
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
    Other warnings are re-issued as they were.
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


def _check_fds(me: Any, count_before: int, targets_before: dict[int, str]) -> list[str]:
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
    count_after: int = me.num_fds()
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


@contextlib.contextmanager
def _check_leaks() -> Iterator[None]:
    """Fail (``pytest.fail``) if the block leaves child processes or descriptors behind.

    What ``corral_no_leaks`` runs around a test; leftover child processes are
    killed and reaped before the failure is raised. Raises ``pytest.UsageError``
    if psutil is not installed.
    """
    if not _HAVE_PSUTIL:
        raise pytest.UsageError(_psutil_missing(f"the {MARKER} check"))
    me = psutil.Process()
    gc.collect()
    gc.freeze()  # what is alive now is not this test's: later collections skip it
    children_before = _children(me)
    fds_before: int = me.num_fds()
    targets_before = _fd_targets()
    yield
    problems = _check_processes(me, children_before)
    problems += _check_fds(me, fds_before, targets_before)
    if problems:
        pytest.fail(
            f"test left resources behind ({MARKER} leak check):\n" + "\n".join(problems),
            pytrace=False,
        )


def _wants_check(node: pytest.Item) -> bool:
    marker = node.get_closest_marker(MARKER)
    if marker is None:
        return bool(node.config.getini(INI_OPTION))
    enabled = marker.args[0] if marker.args else marker.kwargs.get("enabled", True)
    if not isinstance(enabled, bool) or len(marker.args) + len(marker.kwargs) > 1:
        raise pytest.UsageError(
            f"{MARKER} takes one optional bool (enabled), got "
            f"args={marker.args!r} kwargs={marker.kwargs!r} on {node.nodeid}"
        )
    return enabled


@pytest.fixture(autouse=True)
def _corral_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    node = request.node
    if not isinstance(node, pytest.Item) or not _wants_check(node):
        yield
        return
    with _check_leaks():
        yield
