"""The README's twenty-line example and docs/getting-started.md's programs, run as a
new user runs them: as scripts, with logging left unconfigured. They print their own
output on stdout and nothing else; stderr stays quiet (nothing below WARNING).

The programs are read from the documents themselves, so a change to a page that
breaks its program breaks this test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def _blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), re.S)


def _block_starting(page: Path, first_line: str) -> str:
    found = [b for b in _blocks(page, "python") if b.startswith(first_line)]
    assert len(found) == 1, f"{page.name}: no single block starting {first_line!r}"
    return found[0]


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_the_readme_example_prints_only_its_own_output(tmp_path: Path) -> None:
    readme = ROOT / "README.md"
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "workers.py").write_text(_block_starting(readme, "# myapp/workers.py"))
    application = _block_starting(readme, "# the application")
    imports, _, body = application.partition("\n\n")
    script = tmp_path / "main.py"
    script.write_text(
        f"import asyncio\n{imports}\n\n\nasync def main() -> None:\n"
        f"{textwrap.indent(body, '    ')}\n\nasyncio.run(main())\n"
    )
    done = _run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n1\n2\n"
    assert done.stderr == ""


def test_with_structlog_configured_by_the_application_the_events_go_through_it(
    tmp_path: Path,
) -> None:
    readme = ROOT / "README.md"
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "workers.py").write_text(_block_starting(readme, "# myapp/workers.py"))
    # Configured after corral is imported, as applications do.
    script = tmp_path / "main.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            from corral import Pool
            import structlog

            structlog.configure(
                processors=[structlog.processors.add_log_level,
                            structlog.processors.JSONRenderer()],
                logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            )

            async def main() -> None:
                async with Pool("myapp.workers:app", size=1, name="app") as pool:
                    print(await pool.call("add", 1, 2))

            asyncio.run(main())
            """
        )
    )
    done = _run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "3\n"
    events = [json.loads(line) for line in done.stderr.splitlines()]
    ready = [e for e in events if e["event"] == "worker.ready"]
    assert len(ready) == 1 and ready[0]["pool"] == "app" and ready[0]["worker_id"] == "app-w1"
    assert ready[0]["level"] == "info"  # below WARNING: the application's choice now
    assert {"pool.starting", "pool.closed"} <= {e["event"] for e in events}


def test_the_getting_started_programs_print_only_their_own_output(tmp_path: Path) -> None:
    page = ROOT / "docs" / "getting-started.md"
    (tmp_path / "workers.py").write_text(_block_starting(page, "# workers.py"))
    main = _block_starting(page, "# main.py")
    step_four = next(
        b for b in _blocks(page, "python") if b.lstrip().startswith('await pool.call("remember"')
    )
    done = _run(_write(tmp_path / "main.py", main), tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"3\n10 calls at once ran in [12] worker processes\n", done.stdout)
    assert done.stderr == ""

    # Step 4: the session and stream lines, added at the end of the `async with` block.
    anchor = 'print(f"10 calls at once ran in {len(set(pids))} worker processes")\n'
    assert anchor in main
    extended = main.replace(anchor, anchor + step_four)
    done = _run(_write(tmp_path / "main.py", extended), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("{'name': 'Ada', 'lang': 'Python'}\nitem 0\nitem 1\nitem 2\n"), (
        done.stdout
    )
    assert done.stderr == ""

    # `corral call` from the shell, as the page shows it: prints 3, and only that.
    corral = Path(sys.executable).with_name("corral")
    shell = subprocess.run(
        [str(corral), "call", "workers:app", "add", "1", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert (shell.returncode, shell.stdout, shell.stderr) == (0, "3\n", "")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
