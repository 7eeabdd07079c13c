"""corral's pytest plugin (corral.pytest_plugin): the corral_pool fixture and the leak check.

Most cases run an inner pytest session in a subprocess (pytester), where the
plugin is loaded the way a user gets it: through the ``pytest11`` entry point
that installing corral registers. The worker target of the inner tests is a
module written into the inner run's directory, which is on the inner
process's (and so the workers') PYTHONPATH.
"""

from __future__ import annotations

import json

import psutil
import pytest
from tests._helpers import assert_sleeper_is_gone

from corral import Pool, WorkerStartError
from corral.pytest_plugin import PoolFactory

pytest_plugins = ["pytester"]

INNER_APP = """
from corral.worker import App

app = App()


@app.handler
def add(a, b):
    return a + b
"""

# Helpers for the inner tests: the test process's recursive children, by pid and
# create time, and whether such a recorded process is gone (a zombie counts as gone:
# it runs nothing, and its parent reaps it).
INNER_HELPERS = """
import json
from pathlib import Path

import psutil


def record_tree(name):
    tree = [[p.pid, p.create_time()] for p in psutil.Process().children(recursive=True)]
    Path(name).write_text(json.dumps(tree))
    return tree


def still_running(name):
    alive = []
    for pid, created in json.loads(Path(name).read_text()):
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-q", "-o", "asyncio_default_fixture_loop_scope=function", *args
    )


def _still_running(tree: list[list[float]]) -> list[int]:
    alive = []
    for pid, created in tree:
        try:
            proc = psutil.Process(int(pid))
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(inner_app=INNER_APP, inner_helpers=INNER_HELPERS)
    return pytester


def test_corral_pool_in_strict_mode(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_strict="""
        import pytest

        from inner_helpers import record_tree, still_running

        CLOSED = []


        def record_close(pool, other):
            # What the factory's teardown does, in order: which pool it closes, and
            # whether the other pool was already closed at that moment.
            original = pool.aclose

            async def aclose():
                CLOSED.append((pool.name, other.stats().closed))
                await original()

            pool.aclose = aclose


        async def test_async_test_without_the_marker_is_not_run_in_strict_mode():
            pass


        @pytest.mark.asyncio
        async def test_pool_is_started_and_usable(corral_pool):
            pool = await corral_pool("inner_app:app", size=2)
            assert pool.stats().ready == 2
            assert await pool.call("add", 1, 2) == 3
            # two workers, each under its shepherd
            assert len(record_tree("usable.json")) == 4


        def test_its_pool_was_closed_at_teardown():
            assert still_running("usable.json") == []


        @pytest.mark.asyncio
        async def test_two_pools(corral_pool):
            first = await corral_pool("inner_app:app", size=1, name="first")
            second = await corral_pool("inner_app:app", size=1, name="second")
            record_close(first, other=second)
            record_close(second, other=first)
            assert await first.call("add", 1, 1) == await second.call("add", 2, 0)
            record_tree("two.json")


        def test_they_were_closed_newest_first():
            assert CLOSED == [("second", False), ("first", True)]
            assert still_running("two.json") == []


        @pytest.mark.asyncio
        async def test_fails_with_its_pool_open(corral_pool):
            pool = await corral_pool("inner_app:app", size=1)
            assert await pool.call("add", 1, 2) == 3
            record_tree("failed.json")
            raise AssertionError("this test fails; its pool is closed all the same")


        def test_the_failed_tests_pool_was_closed():
            assert still_running("failed.json") == []


        @pytest.mark.asyncio
        @pytest.mark.corral_no_leaks
        async def test_leak_check_runs_after_the_pools_and_the_loop_are_closed(corral_pool):
            pool = await corral_pool("inner_app:app", size=2)
            assert await pool.call("add", 2, 2) == 4
        """
    )
    result = _run(inner, "-o", "asyncio_mode=strict")
    result.assert_outcomes(passed=6, failed=2)
    # The unmarked async test failing is what shows strict mode was on.
    result.stdout.fnmatch_lines(
        [
            "*test_async_test_without_the_marker_is_not_run_in_strict_mode*",
            "async def functions are not natively supported.",
            "*test_fails_with_its_pool_open*",
            "*AssertionError: this test fails; its pool is closed all the same",
        ]
    )
    # And still nothing left once the inner session is over.
    for name in ("usable.json", "two.json", "failed.json"):
        assert _still_running(json.loads((inner.path / name).read_text())) == []


async def test_corral_pool_in_auto_mode(corral_pool: PoolFactory) -> None:
    # This suite runs in auto mode: no asyncio marker.
    pool = await corral_pool("tests.workers.basic:app", size=1)
    assert isinstance(pool, Pool)
    assert await pool.call("add", 1, 2) == 3


async def test_corral_pool_start_failure_reaches_the_test(corral_pool: PoolFactory) -> None:
    with pytest.raises(WorkerStartError, match="model file missing"):
        await corral_pool("tests.workers.bad:startup_fails", size=1)


def test_marker_fails_a_test_that_leaks_a_child_and_kills_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess
        from pathlib import Path

        import pytest

        KEPT = []


        @pytest.mark.corral_no_leaks
        def test_leaves_a_sleeper():
            proc = subprocess.Popen(["sleep", "30"])
            Path("leaked.pid").write_text(str(proc.pid))
            # neither waited for nor killed


        @pytest.mark.corral_no_leaks
        def test_cleans_up():
            subprocess.run(["true"], check=True)


        def test_unmarked_tests_are_not_checked():
            KEPT.append(open(__file__))
        """
    )
    result = _run(pytester)
    pid = int((pytester.path / "leaked.pid").read_text())
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_sleeper*",
            "*test left resources behind (corral_no_leaks leak check):*",
            "*1 child process(es) still running after the test (now killed):*",
            f"*leaked pid {pid}: sleep 30*",
        ]
    )
    assert_sleeper_is_gone(pid)  # the check killed and reaped it


def test_ini_option_checks_every_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        KEPT = []


        def test_leaves_a_file_open():
            KEPT.append(open(__file__))


        @pytest.mark.corral_no_leaks(False)
        def test_exempt():
            KEPT.append(open(__file__))
        """
    )
    result = _run(pytester, "-o", "corral_leak_check=true")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_file_open*",
            "*open file descriptors grew from * to *",
            "*leaked fd * -> */test_ini_option_checks_every_test.py*",
        ]
    )


def test_marker_with_a_bad_argument_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.corral_no_leaks("yes")
        def test_x():
            pass
        """
    )
    result = _run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*corral_no_leaks takes one optional bool (enabled)*"])


def test_without_psutil_the_check_is_a_usage_error(pytester: pytest.Pytester) -> None:
    # A module of that name first on the inner run's sys.path hides the real psutil.
    pytester.makepyfile(psutil="raise ImportError('psutil is hidden by this test')")
    pytester.makepyfile(
        test_needs_psutil="""
        import pytest

        def test_unchecked():
            pass

        @pytest.mark.corral_no_leaks
        def test_checked():
            pass
        """
    )
    result = _run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the corral_no_leaks check (corral's leak check) needs psutil*"])

    result = _run(pytester, "-o", "corral_leak_check=true")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the corral_leak_check ini option * needs psutil*"])


def test_without_pytest_asyncio_corral_pool_is_a_usage_error(pytester: pytest.Pytester) -> None:
    # pytest-asyncio's plugin is not loaded, and a module of that name hides it.
    pytester.makepyfile(pytest_asyncio="raise ImportError('hidden by this test')")
    pytester.makepyfile(
        test_no_asyncio="""
        def test_uses_the_factory(corral_pool):
            pass

        def test_does_not():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-p", "no:asyncio")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the corral_pool fixture needs pytest-asyncio*"])
