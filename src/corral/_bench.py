"""``corral bench``: the benchmark table of a corral source checkout, with a progress bar.

Owns: finding the harness (``benchmarks/run.py`` at the root of a source
checkout) and drawing its progress. Must not touch: the measurements; the
harness owns them and is the same code ``python -m benchmarks.run`` runs.

The harness is not part of the installed package (decision 0016): it compares
corral with other libraries and with a hand-written floor, for the figures in
docs/performance.md, which is a job for a checkout of the source. Imported by
the command line alone; rich is loaded only to draw the bar (``--help`` works
without it).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import corral

from ._install import install_command

__all__ = ["NOT_A_CHECKOUT", "find_checkout", "run_bench"]

NOT_A_CHECKOUT = (
    "corral bench runs the benchmark harness of a corral source checkout "
    "(benchmarks/run.py at its root), and none was found next to the installed "
    "package or in {cwd} and its parents. Run it from a clone of the repository, "
    "with `pip install -e '.[bench]'` (the extra brings the libraries compared)."
)


def _candidates() -> list[Path]:
    package_root = Path(corral.__file__).resolve().parents[2]  # src/corral/__init__.py
    cwd = Path.cwd()
    return [package_root, cwd, *cwd.parents]


def find_checkout(candidates: Iterable[Path]) -> Path | None:
    """The first directory holding ``benchmarks/run.py``, or None."""
    for root in candidates:
        if (root / "benchmarks" / "run.py").is_file():
            return root
    return None


def _load_harness(root: Path) -> ModuleType:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # workers inherit sys.path: benchmarks.corral_app imports
    return importlib.import_module("benchmarks.run")


class _Bar:
    """The harness's progress, as one rich bar over the figures, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<48}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("figures"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            redirect_stdout=False,  # the table goes to stdout, after the bar is done
        )
        self.task = self.progress.add_task("starting", total=None)

    def planned(self, figures: int) -> None:
        self.progress.update(self.task, total=figures)
        self.progress.start()

    def measured(self, system: str, figure: str) -> None:
        self.progress.update(self.task, advance=1, description=f"{system}: {figure}")
        task = self.progress.tasks[0]
        if task.total is not None and task.completed >= task.total:
            self.progress.update(self.task, description="done")
            self.progress.stop()


def run_bench(argv: list[str]) -> int:
    """``corral bench [--quick] [--systems ...] [--uvloop]``: the table on stdout."""
    root = find_checkout(_candidates())
    if root is None:
        sys.stderr.write(NOT_A_CHECKOUT.format(cwd=Path.cwd()) + "\n")
        return 2
    harness = _load_harness(root)
    args = harness.build_parser(prog="corral bench").parse_args(argv)  # --help needs no rich
    try:
        import rich  # noqa: F401 - the progress bar; checked before anything is measured
    except ImportError:
        sys.stderr.write(
            f"corral bench draws its progress with rich, which is not installed: "
            f"{install_command('cli')}\n"
        )
        return 2
    bar = _Bar()
    try:
        harness.run(args, bar)
    finally:
        bar.progress.stop()
    return 0
