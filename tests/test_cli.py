"""The ``corral`` command line, run as a user runs it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests._serve import serve_in_thread, status_demo_app

import corral
from corral import _install
from corral._install import install_command

ROOT = Path(__file__).resolve().parent.parent


def test_corral_demo_runs_the_mixed_workload_and_ends_by_itself() -> None:
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "corral._cli", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 30
    out = run.stdout
    for expected in (
        "plain calls",
        "sessions",
        "streamed reply",
        "WorkerCrashed",
        "back to 2 ready workers",
        "CallTimeout",
        "latency p99",
        "workers restarted",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_corral_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "corral._cli", "version"], capture_output=True, text=True, timeout=30
    )
    assert run.stdout.strip() == f"corral {corral.__version__}"


def _corral(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral._cli", *args], capture_output=True, text=True, timeout=60
    )


def test_corral_call_prints_the_result_as_json() -> None:
    run = _corral("call", "tests.workers.basic:app", "add", "2", "40")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "42"
    run = _corral("call", "tests.workers.basic:app", "echo", "not json")
    assert run.stdout.strip() == '"not json"'


def test_corral_call_reports_a_typed_error() -> None:
    run = _corral("call", "tests.workers.basic:app", "fail", "boom")
    assert run.returncode == 1
    assert run.stderr.startswith("RemoteError: ValueError: boom")


def test_corral_top_shows_a_live_pool_of_the_demo_worker_and_a_replaced_worker() -> None:
    run = _corral("top", "--size", "2", "--duration", "6", "--crash-every", "3")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "corral pool1  open  corral._demo_app:app" in out
    lines = out.splitlines()
    workers = [line.split() for line in lines if line.strip().startswith("pool1-w")]
    evicted = [line.split() for line in lines if " died " in line]
    assert len(workers) == 2, out
    assert any(int(row[5].replace(",", "")) > 0 for row in workers if row[2] != "starting"), out
    # The demo load killed a worker after 1 s (a third of --crash-every): it was replaced.
    assert evicted and evicted[0][-2:] == ["signal", "SIGKILL"], out
    assert {row[0] for row in workers}.isdisjoint({row[3] for row in evicted}), out


def test_corral_top_reads_a_running_service_s_status_page() -> None:
    with serve_in_thread(status_demo_app(size=2)) as base:
        pids = [w["pid"] for w in httpx.get(f"{base}/corral/status.json").json()["workers"]]
        run = _corral("top", "--url", f"{base}/corral", "--duration", "1.5", "--interval", "0.5")
    assert run.returncode == 0, run.stderr
    assert "corral demo  open  corral._demo_app:app" in run.stdout
    for worker_id, pid in zip(("demo-w1", "demo-w2"), pids, strict=True):
        assert re.search(rf"{worker_id}\s+{pid}\s+(ready|busy)", run.stdout), run.stdout


def test_corral_top_says_when_it_cannot_reach_the_service() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port nobody listens on
        port = unused.getsockname()[1]
        run = _corral("top", "--url", f"http://127.0.0.1:{port}/corral", "--duration", "1")
    assert run.returncode == 1
    assert run.stderr.startswith(
        f"corral top: cannot read http://127.0.0.1:{port}/corral/status.json"
    )


def test_corral_top_takes_a_target_or_a_url_not_both() -> None:
    run = _corral("top", "tests.workers.basic:app", "--url", "http://127.0.0.1:1/")
    assert run.returncode == 2
    assert "not both" in run.stderr


def test_corral_bench_measures_the_installed_package_anywhere(tmp_path: Path) -> None:
    """``corral bench`` needs no source checkout: it runs from any directory."""
    run = subprocess.run(
        [sys.executable, "-m", "corral._cli", "bench", "--quick"],
        cwd=tmp_path,  # no benchmarks/ folder here or above
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("floor ") for line in lines), run.stdout
    assert any(line.startswith("corral ") for line in lines), run.stdout
    ratios = [line for line in lines if line.startswith("corral/floor")]
    assert ratios and ratios[0].count("x") == 4, run.stdout  # four ratios to the floor


def test_the_installed_package_never_reaches_into_the_repository_benchmarks() -> None:
    package = Path(corral.__file__).parent
    for path in package.rglob("*.py"):
        source = path.read_text()
        assert "import benchmarks" not in source and "from benchmarks" not in source, path
        assert '"benchmarks"' not in source, path


def test_without_rich_the_library_works_and_top_says_what_to_install() -> None:
    # rich made unimportable: corral imports it only in ``top`` and ``bench``.
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "import corral, corral.asgi, corral.worker\n"
        "from corral._cli import main\n"
        "assert main(['call', 'tests.workers.basic:app', 'add', '1', '2']) == 0\n"
        "sys.exit(main(['top', '--duration', '1']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stdout.strip() == "3"
    # corral here is an editable install of this checkout: the hint says so.
    assert "pip install -e '.[cli]'" in run.stderr


def test_install_hints_name_the_command_for_how_corral_was_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parent.parent
    assert install_command("cli", cwd=str(root)) == "pip install -e '.[cli]'"
    assert install_command("cli", cwd=str(tmp_path)) == f"pip install -e '{root}[cli]'"

    class Dist:
        def __init__(self, text: str | None) -> None:
            self.text = text

        def read_text(self, name: str) -> str | None:
            assert name == "direct_url.json"
            return self.text

    def installed(text: str | None) -> None:
        monkeypatch.setattr(_install.metadata, "distribution", lambda name: Dist(text))

    installed(None)  # from an index: pip writes no direct_url.json
    assert install_command("cli") == "pip install 'corral[cli]'"
    installed('{"url": "file:///src/my%20corral", "dir_info": {}}')  # pip install /src/...
    assert install_command("cli", cwd=str(tmp_path)) == "pip install '/src/my corral[cli]'"
    installed('{"url": "https://example.invalid/corral.tar.gz", "archive_info": {}}')
    assert install_command("cli") == "pip install 'corral[cli]'"


TARGET = "tests.workers.basic:app"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["tests.workers.basic", "add", "1", "2"], "target must look like 'package.module:app'"),
        ([":app", "add"], "the module name is missing"),
        (["tests.workers.basic:", "add"], "the App's name after ':' is missing"),
        ([TARGET, "add", "1", "2", "--timeout", "-1"], "--timeout: SECONDS must be > 0 seconds"),
        ([TARGET, "add", "1", "2", "--timeout", "nan"], "SECONDS must be a finite number"),
        ([TARGET, "add", "1", "2", "--timeout", "soon"], "--timeout: must be a number"),
        ([TARGET, "add", "[1, 2", "3"], "'[1, 2' is not valid JSON"),
        (["no_such_module_here:app", "add"], "no module named 'no_such_module_here'"),
        ([TARGET, "sub", "1", "2"], "has no handler 'sub'; its handlers: add,"),
        ([TARGET, "count", "3"], "'count' streams its results: add --stream"),
    ],
)
def test_corral_call_mistakes_give_one_line_and_exit_code_2(args: list[str], says: str) -> None:
    run = _corral("call", *args)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert run.stderr.startswith("corral call: ") and run.stderr.count("\n") == 1, run.stderr
    assert says in run.stderr


def test_corral_call_a_worker_that_cannot_start_says_why_in_one_line() -> None:
    run = _corral("call", "tests.workers.basic:no_such_app", "add", "1", "2")
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert "AttributeError" in run.stderr and "no_such_app" in run.stderr


def test_corral_call_streams_and_takes_a_session() -> None:
    run = _corral("call", TARGET, "count", "3", "--stream")
    assert (run.returncode, run.stdout) == (0, "0\n1\n2\n"), run.stderr
    run = _corral("call", TARGET, "whoami", "--session", "user-42")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["session"] == "user-42"


def test_corral_bench_help_works_without_rich() -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from corral._cli import main\n"
        "sys.exit(main(['bench', '--help']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    assert "--quick" in run.stdout and "--calls" in run.stdout


def test_corral_bench_without_rich_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from corral._cli import main\n"
        "sys.exit(main(['bench', '--quick']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 2, run.stderr
    assert "rich" in run.stderr and "pip install -e '.[cli]'" in run.stderr


def test_corral_bench_measures_placed_workers_only_when_asked() -> None:
    from benchmarks.run import PLACED, build_parser, selected_systems

    quick = selected_systems(build_parser().parse_args(["--quick"]))
    assert "corral" in quick and not set(PLACED) & set(quick)
    assert set(PLACED) <= set(selected_systems(build_parser().parse_args(["--placed"])))
    named = build_parser().parse_args(["--systems", "corral", "corral tcp"])
    assert selected_systems(named) == ["corral", "corral tcp"]


def test_corral_top_and_demo_mistakes_give_one_line() -> None:
    for args, code in (
        (["top", "tests.workers.basic", "--duration", "1"], 2),
        (["top", "no_such_module_here:app", "--duration", "1"], 2),
        (["top", "tests.workers.basic:no_such_app", "--duration", "1"], 1),
        (["top", "--size", "0", "--duration", "1"], 2),
        (["demo", "--size", "-3"], 2),
    ):
        run = _corral(*args)
        assert run.returncode == code, (args, run.stderr)
        assert run.stderr.startswith(f"corral {args[0]}: "), run.stderr
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr


def test_corral_bench_reads_cpu_finer_than_a_clock_tick_and_never_divides_by_zero() -> None:
    """A quick run's floor worker spends a few ms: ``stat``'s 10 ms ticks would read 0.

    Measured as the bench measures a worker: another process, asleep in a read
    between the two readings (a running thread's count is brought up to date
    when it is switched out).
    """
    from corral._bench import _cpu_of, _ratio

    burn = (
        "import sys, time\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "sys.stdin.readline()\n"
        "t = time.process_time() + 0.002\n"
        "while time.process_time() < t: pass\n"
        "sys.stdout.write('burnt\\n'); sys.stdout.flush()\n"
        "sys.stdin.readline()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        before = _cpu_of(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "burnt\n"
        spent = _cpu_of(child.pid) - before
        # 2 ms of CPU and a little I/O: clock ticks would read 0 or 10 ms
        assert 0.002 <= spent < 0.009, spent
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0
    assert _ratio(2.0, 0.0, 8).strip() == "n/a"
    assert _ratio(3.0, 2.0, 8) == "    1.50x"
