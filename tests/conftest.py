"""Suite-wide leak check: every test must leave no child process and no open descriptor.

corral's promise is that closing a pool leaves nothing behind, so the whole suite
checks it, not just the tests written about it. The check is corral's own pytest
plugin (``corral.pytest_plugin``, loaded through the ``pytest11`` entry point
that installing corral registers): every collected test gets its
``corral_no_leaks`` marker, so it fails, as an error at teardown, if after the
test and its event loop are done

- a child process that was not there before is still alive a few seconds later
  (it is SIGKILLed and reaped before the failure is reported, by pid and
  command line);
- the number of open descriptors grew (the new ones are listed, from
  ``/proc/self/fd``);
- collecting the test's garbage raised ResourceWarnings or errors in
  finalizers: something was left for the garbage collector to close.

The plugin's docstring says how, and what is out of reach (wider-scoped
fixtures, double forks).

``@pytest.mark.allow_leaks`` turns the check off for a test that deliberately
manages processes or descriptors beyond its own end.
"""

from __future__ import annotations

import inspect

import pytest

import corral.pytest_plugin


def pytest_configure(config: pytest.Config) -> None:
    # Without the plugin the suite would run unchecked: refuse instead.
    if not config.pluginmanager.is_registered(corral.pytest_plugin):
        raise pytest.UsageError(
            "corral's pytest plugin is not loaded: install corral (pip install -e '.[suite]') "
            "so its pytest11 entry point is registered, and do not pass -p no:corral"
        )
    config.addinivalue_line(
        "markers",
        "allow_leaks: do not fail this test for child processes or file descriptors "
        "it leaves behind (it manages them itself)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("allow_leaks") is None:
            item.add_marker(pytest.mark.corral_no_leaks)


# --- the suite under anyio's pytest plugin --------------------------------------------
# ``pytest -p no:asyncio`` runs the async tests with anyio's plugin instead of
# pytest-asyncio (on anyio's asyncio backend), as FastAPI and Starlette users run
# theirs: every coroutine test gets the ``anyio`` marker, and its async fixtures
# run in the same loop. ``nox -s anyio`` does that for a representative set.


def _pytest_asyncio_loaded(config: pytest.Config) -> bool:
    return config.pluginmanager.has_plugin("asyncio")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    if (
        inspect.iscoroutinefunction(obj)
        and collector.funcnamefilter(name)
        and not _pytest_asyncio_loaded(collector.config)
    ):
        obj.pytestmark = [*getattr(obj, "pytestmark", []), pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    """anyio's plugin on the asyncio backend: corral runs on asyncio only."""
    return "asyncio"
