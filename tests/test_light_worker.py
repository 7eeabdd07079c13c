"""A worker imports at start only what serving calls needs (docs/performance.md).

Every module a worker imports costs memory in each worker and time at each
start; the parent's side of corral, structlog and rich (which structlog loads
when it is installed) are not needed to serve calls, and asyncio only by apps
with async code.
"""

from __future__ import annotations

import pytest

from corral import Pool

# Never imported by an idle worker; a name covers its submodules.
HEAVY = ("rich", "structlog", "corral._pool", "corral._handle", "corral._launch", "shutil")


def _heavy(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


@pytest.mark.parametrize(
    ("target", "also_absent"),
    [
        ("tests.workers.light:app", ("asyncio", "concurrent")),  # no async code: no loop
        ("tests.workers.basic:app", ()),  # async handlers: asyncio, on a thread of its own
    ],
)
async def test_an_idle_worker_imports_nothing_heavy(
    target: str, also_absent: tuple[str, ...]
) -> None:
    async with Pool(target, size=1) as pool:
        modules = await pool.call("loaded_modules")
    assert "corral.worker" in modules  # the probe sees the worker's own modules
    assert _heavy(modules, HEAVY + also_absent) == []


async def test_structlog_is_imported_when_the_worker_logs() -> None:
    # The logger is made on first use: a worker that has something to say still says it.
    from corral.worker._log import worker_log

    log = worker_log("w-test")
    assert log._bound is None
    log.bind(extra=1)  # any use makes the real logger
    assert log._bound is not None
