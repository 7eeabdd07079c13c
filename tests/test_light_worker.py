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


@pytest.mark.parametrize(
    "argv",
    [
        ["pkg.mod:app"],
        ["pkg.mod:app", "--fds", "3,4,5", "--worker-id", "pool1-w1"],
        ["--fds=3,4", "pkg.mod:app", "--max-message-size", "1024", "--shm-prefix", "corral-1-"],
        ["pkg.mod:app", "--large-buffer-threshold", "262144", "--worker-id=w"],
    ],
)
def test_the_worker_reads_its_command_line_as_argparse_would(argv: list[str]) -> None:
    # The fast reading (no argparse imported) gives what argparse gives.
    from corral.worker.__main__ import _parse_args, _parser

    assert vars(_parse_args(argv)) == vars(_parser().parse_args(argv))


@pytest.mark.parametrize(
    "argv", [[], ["pkg.mod:app", "--bogus"], ["pkg.mod:app", "--fds"], ["a:b", "c:d"]]
)
def test_a_bad_worker_command_line_gets_argparse_s_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from corral.worker.__main__ import _parse_args

    with pytest.raises(SystemExit) as exited:
        _parse_args(argv)
    assert exited.value.code == 2
    assert "usage: python -m corral.worker" in capsys.readouterr().err
