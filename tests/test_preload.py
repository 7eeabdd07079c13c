"""Preloaded workers: heavy modules imported once in a template, workers forked from it.

Every guarantee of a plainly spawned worker holds for a forked one: real exit
status, group kill, nothing left after the parent's SIGKILL, only the protocol
descriptors, the environment allowlist.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from tests._processes import parent_program

import corral
from corral import Pool

ROOT = Path(__file__).resolve().parent.parent
TARGET = "tests.workers.preloaded:app"
SLOW = "tests.workers.slow_import"


def _imports(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split()]


@pytest.fixture
def import_log(tmp_path: Path) -> Path:
    return tmp_path / "imports.log"


def _pool(import_log: Path, **options) -> Pool:
    env = {"CORRAL_TEST_IMPORT_LOG": str(import_log), **options.pop("env", {})}
    return Pool(TARGET, preload=[SLOW], env=env, **options)


async def _pids_by_worker(pool: Pool) -> dict[str, tuple[int, int]]:
    """worker id -> (worker pid, pid that imported the slow module), via checkouts."""
    seen = {}
    for worker in pool.workers:
        assert worker.pid is not None
    leases = []
    try:
        for _ in pool.workers:
            lease = pool.checkout(timeout=10)
            leases.append(lease)
            got = await lease.__aenter__()
            seen[got.id] = (await got.call("pid"), await got.call("imported_by"))
    finally:
        for lease in reversed(leases):
            await lease.__aexit__(None, None, None)
    return seen


async def test_the_preload_module_is_imported_once_in_the_template(import_log) -> None:
    async with _pool(import_log, size=2) as pool:
        seen = await _pids_by_worker(pool)
        assert len(seen) == 2
        template_pids = {importer for _, importer in seen.values()}
        worker_pids = {pid for pid, _ in seen.values()}
        assert len(template_pids) == 1, "both workers see one import"
        assert not template_pids & worker_pids, "the import ran in the template, not a worker"
        assert _imports(import_log) == list(template_pids)
        assert await pool.call("add", 2, 3) == 5


async def test_sessions_and_streams_work_on_forked_workers(import_log) -> None:
    async with _pool(import_log, size=2) as pool:
        await pool.call("remember", "k", 42, session="s1")
        assert await pool.call("recall", "k", session="s1") == 42
        assert [x async for x in pool.stream("count", 4)] == [0, 1, 2, 3]


async def test_a_crashed_worker_reports_its_real_exit_and_is_replaced_by_a_fork(
    import_log,
) -> None:
    async with _pool(import_log, size=1) as pool:
        template = await pool.call("imported_by")
        with pytest.raises(corral.WorkerCrashed) as crashed:
            await pool.call("exit_now", 7)
        assert crashed.value.exit_code == 7
        await pool.wait_ready(timeout=10)
        victim = await pool.call("pid")
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(corral.WorkerCrashed) as killed:
            await pool.call("sleep", 30)
        assert killed.value.exit_code == -9
        await pool.wait_ready(timeout=10)
        assert await pool.call("imported_by") == template
        assert await pool.call("pid") not in (victim, template)
        assert _imports(import_log) == [template], "replacements were forked, not re-imported"


async def test_a_crashed_forked_worker_takes_its_grandchildren_with_it(import_log) -> None:
    async with _pool(import_log, size=1) as pool:
        grandchild = await pool.call("spawn_grandchild")
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 3)
        _, alive = psutil.wait_procs([psutil.Process(grandchild)], timeout=2.0)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


async def test_a_killed_shepherd_takes_its_forked_worker_and_is_reported(import_log) -> None:
    async with _pool(import_log, size=1) as pool:
        worker_pid = await pool.call("pid")
        grandchild = await pool.call("spawn_grandchild")
        call = asyncio.ensure_future(pool.call("sleep", 30))
        os.kill(pool.workers[0]._launched.pid, signal.SIGKILL)
        with pytest.raises(corral.WorkerCrashed) as crashed:
            await call
        assert crashed.value.exit_code == -9
        procs = [psutil.Process(p) for p in (worker_pid, grandchild) if psutil.pid_exists(p)]
        _, alive = psutil.wait_procs(procs, timeout=2.0)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        await pool.wait_ready(timeout=10)
        assert await pool.call("add", 1, 2) == 3


async def test_a_killed_template_fails_no_call_and_the_pool_recovers(import_log) -> None:
    async with _pool(import_log, size=2) as pool:
        template = await pool.call("imported_by")
        slow = asyncio.ensure_future(pool.call("sleep", 0.5))
        process = psutil.Process(template)  # before the kill: once reaped, the pid is gone
        os.kill(template, signal.SIGKILL)
        assert psutil.wait_procs([process], timeout=5)[1] == []
        assert await slow == 0.5  # a call in flight on a forked worker is untouched
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        await pool.wait_ready(timeout=20)  # replaced although the template is gone
        for _ in range(4):
            assert await pool.call("add", 1, 1) == 2
        assert pool.stats().failed_starts == 0


async def test_a_template_started_again_serves_later_replacements(import_log) -> None:
    async with _pool(import_log, size=1) as pool:
        first = await pool.call("imported_by")
        process = psutil.Process(first)  # before the kill: once reaped, the pid is gone
        os.kill(first, signal.SIGKILL)
        assert psutil.wait_procs([process], timeout=5)[1] == []
        # The first replacement after the template died is spawned plainly while
        # a new template starts; once it is up, replacements are forked from it.
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        await pool.wait_ready(timeout=20)
        await pool._launcher.wait_templates_ready(timeout=20)
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("exit_now", 1)
        await pool.wait_ready(timeout=20)
        second = await pool.call("imported_by")
        assert second not in (first, await pool.call("pid"))
        assert second in _imports(import_log)


async def test_reload_imports_the_preloaded_modules_afresh(import_log) -> None:
    async with _pool(import_log, size=2, env={"CORRAL_TEST_IMPORT_SECONDS": "0"}) as pool:
        before = await pool.call("imported_by")
        await pool.reload(timeout=30)
        seen = await _pids_by_worker(pool)
        after = {importer for _, importer in seen.values()}
        assert len(after) == 1 and before not in after
        assert _imports(import_log) == [before, *after]


async def test_a_preload_that_fails_to_import_fails_the_start_clearly() -> None:
    started = time.monotonic()
    with pytest.raises(corral.WorkerStartError) as failed:
        async with Pool(TARGET, size=1, preload=["tests.workers.preload_fails"]):
            pass
    assert "tests.workers.preload_fails" in failed.value.message
    assert "preload boom" in (failed.value.stderr_tail or "")
    assert time.monotonic() - started < 20


async def test_a_preload_that_starts_threads_is_refused() -> None:
    with pytest.raises(corral.WorkerStartError, match="started-by-import"):
        async with Pool(TARGET, size=1, preload=["tests.workers.preload_starts_thread"]):
            pass


async def test_forked_workers_hold_only_stdio_and_their_protocol_pipes(import_log) -> None:
    async with Pool("tests.workers.basic:app", size=1) as plain:
        plain_fds = await plain.call("open_fds")
    async with _pool(import_log, size=1) as pool:
        fds = await pool.call("open_fds")
        pipes = [fd for fd, target in fds.items() if target.startswith("pipe:")]
        assert set(pipes) == {1, 2, *await pool.call("wire_fds")}
        assert fds[0] == "/dev/null"

    def kinds(found: dict[str, str]) -> collections.Counter[str]:
        return collections.Counter(t.split(":")[0] for t in found.values())

    # The same kinds and counts as a plain worker: nothing of the template's leaks in.
    assert kinds(fds) == kinds(plain_fds)


async def test_the_env_allowlist_still_applies_to_forked_workers(monkeypatch, import_log) -> None:
    monkeypatch.setenv("CORRAL_TEST_SECRET", "canary-4711")
    monkeypatch.setenv("CORRAL_TEST_ALLOWED", "yes")
    async with _pool(
        import_log,
        size=1,
        env_allowlist=["CORRAL_TEST_ALLOWED", "PATH"],
        env={"EXTRA": "1"},
    ) as pool:
        pid = await pool.call("pid")
        template = await pool.call("imported_by")
        for process in (pid, template):
            environ = Path(f"/proc/{process}/environ").read_bytes()  # noqa: ASYNC240 - procfs
            assert b"canary-4711" not in environ
        got = await pool.call("environ", ["CORRAL_TEST_SECRET", "CORRAL_TEST_ALLOWED", "EXTRA"])
        assert got == {"CORRAL_TEST_SECRET": None, "CORRAL_TEST_ALLOWED": "yes", "EXTRA": "1"}
        assert await pool.call("rlimits", ["RLIMIT_CORE"]) is not None


async def test_worker_rlimits_apply_to_forked_workers(import_log) -> None:
    async with _pool(import_log, size=1, worker_rlimits={"nofile": 256}) as pool:
        assert await pool.call("rlimits", ["RLIMIT_NOFILE"]) == {"RLIMIT_NOFILE": [256, 256]}


async def test_without_fork_the_pool_spawns_plainly(monkeypatch, import_log) -> None:
    # fork() exists on every Linux; the fallback is what a platform without it gets.
    monkeypatch.setattr(corral._launch._local, "FORK_AVAILABLE", False)
    async with _pool(import_log, size=1, env={"CORRAL_TEST_IMPORT_SECONDS": "0"}) as pool:
        assert await pool.call("imported_by") == await pool.call("pid")


PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from corral import Pool

    async def main():
        async with Pool(
            "tests.workers.preloaded:app", size=2, preload=["tests.workers.slow_import"],
            env={"CORRAL_TEST_IMPORT_SECONDS": "0"},
        ) as pool:
            grandchild = await pool.call("spawn_grandchild")
            stuck = asyncio.ensure_future(pool.call("hold_the_gil"))
            ok = await pool._wait_until(
                lambda: any("holding the GIL" in w.stderr_tail for w in pool.workers), 10
            )
            assert ok, "the GIL-holding handler never started"
            template = pool._launcher.templates()[0]
            pids = {
                "workers": [w.pid for w in pool.workers],
                "shepherds": [w._launched.pid for w in pool.workers],
                "template": [template.pid, template.shepherd_pid],
                "grandchild": grandchild,
            }
            sys.stdout.write(json.dumps(pids) + "\\n")
            sys.stdout.flush()
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_parent_sigkill_leaves_no_template_and_no_worker_within_one_second() -> None:
    with parent_program(PARENT, reports='{"workers"') as (parent, pids):
        everything = [
            *pids["workers"],
            *pids["shepherds"],
            *pids["template"],
            pids["grandchild"],
        ]
        assert all(psutil.pid_exists(p) for p in everything)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        procs = []
        for pid in everything:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=1.0)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"still running 1s after the parent died: {alive}"


def test_preload_must_be_module_names() -> None:
    with pytest.raises(ValueError, match="preload"):
        Pool(TARGET, preload="numpy")
    with pytest.raises(ValueError, match="preload"):
        Pool(TARGET, preload=["not a module"])
