"""docs/tools.md: the example runs as written and prints what the page says; the
benchmark behind its figures runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "tools.md"


def _example_and_output() -> tuple[str, str]:
    text = PAGE.read_text()
    found = re.search(
        r"<!-- the test suite runs this block[^\n]*-->\n```python\n(.*?)```.*?```text\n(.*?)```",
        text,
        re.DOTALL,
    )
    assert found is not None, "docs/tools.md lost its runnable example"
    return found.group(1), found.group(2)


@pytest.mark.skipif(shutil.which("python3") is None, reason="the example runs python3")
def test_the_repl_example_prints_what_the_page_says(tmp_path: Path) -> None:
    code, expected = _example_and_output()
    script = tmp_path / "repl_pool.py"
    script.write_text(code)
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected


def test_the_tools_benchmark_runs_and_prints_its_table() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.tools",
            *("--rounds", "1", "--calls", "3", "--sizes", "2", "--modes", "pipes"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    header, row = run.stdout.splitlines()[1:3]
    assert "ready p50" in header and "run p99" in header
    assert row.split()[:2] == ["pipes", "2"]
