"""The suite's leak check fails tests that leave things behind.

The check is corral's pytest plugin (corral.pytest_plugin), applied to every
test by tests/conftest.py. Each case runs an inner pytest session, in a
subprocess, with a copy of the suite's conftest and the plugin loaded through
its installed ``pytest11`` entry point, as in the suite itself: a test that
leaves a child process running, one that leaves a file open, a clean one, one
marked ``allow_leaks``, and a run without the plugin, which the conftest refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests._helpers import assert_sleeper_is_gone

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    return pytester


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-q", "-o", "asyncio_default_fixture_loop_scope=function", *args
    )


def test_leaked_child_process_fails_and_is_killed(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import subprocess
        from pathlib import Path

        def test_leaves_a_sleeper():
            proc = subprocess.Popen(["sleep", "30"])
            Path("leaked.pid").write_text(str(proc.pid))
            # neither waited for nor killed
        """
    )
    result = _run(inner)
    pid = int((inner.path / "leaked.pid").read_text())
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_sleeper*",
            "*test left resources behind (corral_no_leaks leak check):*",
            "*child process(es) still running after the test (now killed)*",
            f"*leaked pid {pid}: sleep 30*",
        ]
    )
    assert_sleeper_is_gone(pid)  # the check killed and reaped it


def test_leaked_file_descriptor_fails(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        from pathlib import Path

        KEPT = []

        def test_leaves_a_file_open():
            path = Path("left-open.txt")
            path.write_text("x")
            KEPT.append(open(path))  # kept reachable: gc cannot close it
        """
    )
    result = _run(inner)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*open file descriptors grew from * to *",
            "*leaked fd * -> */left-open.txt*",
        ]
    )


def test_clean_test_passes(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import subprocess

        def test_cleans_up():
            with open(__file__) as f:
                f.read()
            subprocess.run(["true"], check=True)
        """
    )
    result = _run(inner)
    result.assert_outcomes(passed=1)


def test_allow_leaks_marker_skips_the_check(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest

        KEPT = []

        @pytest.mark.allow_leaks
        def test_keeps_a_file_open_on_purpose():
            KEPT.append(open(__file__))
        """
    )
    result = _run(inner)
    result.assert_outcomes(passed=1)


def test_without_the_plugin_the_suite_refuses_to_run(inner: pytest.Pytester) -> None:
    inner.makepyfile("def test_anything(): pass")
    result = _run(inner, "-p", "no:corral")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*corral's pytest plugin is not loaded*"])


def test_a_file_left_in_a_reference_cycle_is_reported(inner: pytest.Pytester) -> None:
    """Only the garbage collector can close it; the check makes it do so and says so."""
    inner.makepyfile(
        """
        from pathlib import Path

        class Holder:
            pass

        def test_leaves_a_file_in_a_cycle():
            path = Path("in-a-cycle.txt")
            path.write_text("x")
            holder = Holder()
            holder.me = holder
            holder.file = open(path)
        """
    )
    result = _run(inner, "-W", "default::ResourceWarning")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*complaint(s) from finalizers run by the garbage collector*",
            "*unclosed file*in-a-cycle.txt*",
        ]
    )


def test_the_check_collects_only_what_the_test_made(inner: pytest.Pytester) -> None:
    """What was alive before a checked test is set aside (gc.freeze) for its collections,
    so the check costs the same in a session with a large heap; the session ends with
    the heap given back to the collector, and what a test leaves in a cycle after it
    ended is still collected before the next test."""
    inner.makepyfile(
        """
        import gc
        import pathlib
        import weakref

        class Node:
            pass

        LEFT = []

        def test_first():
            assert gc.get_freeze_count() > 0
            node = Node()
            node.me = node
            LEFT.append(weakref.ref(node))

        def test_second():
            # the first test's cycle was garbage at its end, collected by the check
            assert LEFT[0]() is None
            assert gc.get_freeze_count() > 0
            pathlib.Path("frozen-in-a-test.txt").write_text(str(gc.get_freeze_count()))
        """
    )
    inner.makeconftest(
        CONFTEST.read_text()
        + "\n\ndef pytest_unconfigure(config):\n"
        + "    import gc, pathlib\n"
        + "    pathlib.Path('frozen-at-exit.txt').write_text(str(gc.get_freeze_count()))\n"
    )
    result = _run(inner)
    result.assert_outcomes(passed=2)
    # Given back: on 3.12, gc.collect() itself keeps a few hundred objects
    # aside (its count after unfreeze() and one collection), never the heap.
    during = int((inner.path / "frozen-in-a-test.txt").read_text())
    at_exit = int((inner.path / "frozen-at-exit.txt").read_text())
    assert at_exit < during / 10, (at_exit, during)
