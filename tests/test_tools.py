"""corral.tools: pools of interactive command-line programs, driven for real.

Every test starts real interactive programs: the Python REPL always (the
interpreter running the tests), sqlite3 and bc when installed (Debian packages
``sqlite3`` and ``bc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys

import psutil
import pytest

from corral import Pool, PoolClosed, PoolTimeout, SessionLost, WorkerStartError
from corral.tools import (
    ReadResult,
    ToolExited,
    ToolPool,
    ToolStartError,
    ToolStatus,
    ToolTimeout,
)

REPL = [sys.executable, "-i", "-q"]
PROMPT = ">>> "
MODES = ["pty", "pipes"]

needs_sqlite3 = pytest.mark.skipif(
    shutil.which("sqlite3") is None, reason="sqlite3 is not installed (apt-get install sqlite3)"
)
needs_bc = pytest.mark.skipif(
    shutil.which("bc") is None, reason="bc is not installed (apt-get install bc)"
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("mode", MODES)
async def test_a_repl_answers_a_line_with_its_output(mode: str) -> None:
    tools = ToolPool(REPL, size=1, prompt=PROMPT, mode=mode)
    async with tools, tools.instance() as repl:
        assert await repl.run("1+1") == "2\n"
        assert await repl.run("print('a'); print('b')") == "a\nb\n"


@pytest.mark.parametrize("mode", MODES)
async def test_instances_run_in_parallel_with_independent_state(mode: str) -> None:
    async with ToolPool(REPL, size=3, prompt=PROMPT, mode=mode) as tools:
        instances = tools.instances
        assert len(instances) == 3
        await asyncio.gather(*(r.run(f"x = {i} * 10") for i, r in enumerate(instances)))
        outputs = await asyncio.gather(*(r.run("x") for r in instances))
        assert outputs == ["0\n", "10\n", "20\n"]
        statuses = await asyncio.gather(*(r.status() for r in instances))
        assert len({s.pid for s in statuses}) == 3
        assert len({r.session_id for r in instances}) == 3


async def test_instance_leases_are_exclusive_and_time_out() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        async with tools.instance() as repl:
            with pytest.raises(PoolTimeout):
                async with tools.instance(timeout=0.2):
                    pass
            assert await repl.run("2*3") == "6\n"
        async with tools.instance(timeout=5) as again:
            assert again is repl


async def test_a_read_timeout_returns_what_arrived_so_far() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools, tools.instance() as repl:
        await repl.send("import time; print('partial', flush=True); time.sleep(60)")
        result = await repl.read_until(timeout=3)  # the prompt cannot come: it sleeps
        assert isinstance(result, ReadResult)
        assert result.text == "partial\n"
        assert result.timed_out and not result.matched and not result.exited
        await repl.interrupt()  # KeyboardInterrupt ends the sleep; the prompt comes back
        after = await repl.read_until(timeout=10)
        assert after.matched and "KeyboardInterrupt" in after.text
        assert await repl.run("40+2") == "42\n"


async def test_run_raises_tool_timeout_carrying_the_partial_output() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools, tools.instance() as repl:
        with pytest.raises(ToolTimeout) as caught:
            await repl.run("print('begun', flush=True); import time; time.sleep(60)", 3)
        assert isinstance(caught.value, TimeoutError)
        assert caught.value.output == "begun\n"


async def test_read_until_a_marker_and_until_a_quiet_period() -> None:
    async with ToolPool(REPL, size=1) as tools:  # no prompt: markers and quiet periods only
        repl = tools.instances[0]
        await repl.send("print('one'); print('two')")
        first = await repl.read_until("one\n", timeout=10)
        assert first.matched and first.text == PROMPT  # the first prompt, shown at start
        rest = await repl.read_until(quiet=1.0, timeout=10)
        assert rest.text == "two\n" + PROMPT
        assert rest.quiet and not rest.matched and not rest.timed_out


async def test_with_a_prompt_a_quiet_period_is_a_fallback() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        repl = tools.instances[0]
        await repl.send("print('done')")
        assert (await repl.read_until(quiet=5, timeout=10)).matched
        await repl.send(
            "import sys; _ = sys.stdout.write('no newline'); sys.stdout.flush(); input()"
        )
        waiting = await repl.read_until(quiet=1.0, timeout=10)
        assert waiting.quiet and waiting.text == "no newline"


@pytest.mark.parametrize("mode", MODES)
async def test_output_larger_than_a_pipe_buffer_arrives_whole(mode: str) -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT, mode=mode) as tools:
        repl = tools.instances[0]
        out = await repl.run("print('x' * 1_000_000)", timeout=30)
        assert out == "x" * 1_000_000 + "\n"
        assert (await repl.status()).bytes_out > 1_000_000


async def test_status_counts_bytes_both_ways_and_reports_the_process() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        repl = tools.instances[0]
        before = await repl.status()
        await repl.run("'abc'")
        after = await repl.status()
        assert isinstance(after, ToolStatus)
        assert after.alive and after.exit_code is None
        assert after.pid == before.pid and _alive(after.pid)
        assert after.bytes_in - before.bytes_in == len("'abc'\n")
        assert after.bytes_out - before.bytes_out == len("'abc'\n>>> ")
        assert after.uptime > 0 and after.restarts == 0
        assert after.command == REPL


@pytest.mark.parametrize("how", ["killed", "exits"])
async def test_an_instance_that_dies_is_reported_and_restarted(how: str) -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        repl = tools.instances[0]
        await repl.run("state = 'kept'")
        old_pid = (await repl.status()).pid
        if how == "killed":
            os.kill(old_pid, signal.SIGKILL)
            expected_code = -signal.SIGKILL
        else:
            await repl.send("import sys; print('bye', flush=True); sys.exit(3)")
            expected_code = 3
        ended = await repl.read_until(timeout=10)
        assert ended.exited and not ended.matched
        assert ended.exit_code == expected_code
        with pytest.raises(ToolExited) as caught:
            await repl.run("1")
        assert caught.value.exit_code == expected_code
        assert not (await repl.health()).ok
        await repl.restart()
        status = await repl.status()
        assert status.alive and status.pid != old_pid and status.restarts == 1
        assert "NameError" in await repl.run("state")  # a fresh interpreter


async def test_a_leased_instance_that_died_is_restarted_before_it_is_handed_out() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        async with tools.instance() as repl:
            os.kill((await repl.status()).pid, signal.SIGKILL)
            with pytest.raises(ToolExited):
                await repl.run("1", timeout=10)
        async with tools.instance() as repl:
            assert await repl.run("1") == "1\n"


async def test_health_probes_the_prompt() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        health = await tools.instances[0].health()
        assert health.ok and health.alive and health.latency is not None


async def test_a_tool_that_exits_at_start_says_which_command_code_and_output() -> None:
    command = [sys.executable, "-c", "print('no luck here'); raise SystemExit(7)"]
    with pytest.raises(ToolStartError) as caught:
        async with ToolPool(command, size=2, prompt=PROMPT):
            pass
    error = caught.value
    assert isinstance(error, WorkerStartError)
    assert error.exit_code == 7
    assert "no luck here" in (error.output_tail or "")
    assert error.command == command
    assert sys.executable in str(error) and "exit code 7" in str(error)


async def test_a_tool_that_never_shows_its_prompt_fails_to_start_within_the_timeout() -> None:
    command = [sys.executable, "-c", "print('hello', flush=True); import time; time.sleep(60)"]
    with pytest.raises(ToolStartError) as caught:
        async with ToolPool(command, size=1, prompt=PROMPT, startup_timeout=3):
            pass
    assert "hello" in (caught.value.output_tail or "")
    assert "prompt" in str(caught.value)


async def test_a_command_that_does_not_exist_fails_to_start() -> None:
    with pytest.raises(ToolStartError, match="no-such-tool-here"):
        async with ToolPool("no-such-tool-here --flag", size=1):
            pass


def test_bad_options_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="mode"):
        ToolPool(REPL, mode="socket")
    with pytest.raises(ValueError, match="size"):
        ToolPool(REPL, size=0)
    with pytest.raises(ValueError, match="command"):
        ToolPool("")


async def test_shutdown_leaves_no_tool_or_worker_behind() -> None:
    tools = ToolPool(REPL, size=4, prompt=PROMPT)
    async with tools:
        tool_pids = [(await r.status()).pid for r in tools.instances]
        worker_pids = [w.pid for w in tools.pool.workers]
        assert all(_alive(p) for p in tool_pids + worker_pids)
    assert not [p for p in tool_pids + worker_pids if p is not None and _alive(p)]
    with pytest.raises(PoolClosed):
        await tools.instances[0].run("1")


async def test_a_closed_session_kills_its_tool() -> None:
    async with Pool("corral.tools._worker:app", size=1) as pool:
        info = await pool.call("tool.start", {"argv": REPL, "prompt": PROMPT}, session="s1")
        assert _alive(info["pid"])
        await pool.close_session("s1")
        proc = psutil.Process(info["pid"])
        await asyncio.to_thread(proc.wait, 10)
        assert not _alive(info["pid"])


async def test_a_dead_worker_takes_its_tools_with_it_and_restart_recovers() -> None:
    async with ToolPool(REPL, size=2, prompt=PROMPT, workers=1) as tools:
        pids = [(await r.status()).pid for r in tools.instances]
        worker = tools.pool.workers[0]
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        _gone, alive = await asyncio.to_thread(
            psutil.wait_procs, [psutil.Process(p) for p in pids], 10
        )
        assert not alive
        with pytest.raises(SessionLost):
            await tools.instances[0].run("1")
        await tools.instances[0].restart()
        assert await tools.instances[0].run("3*3") == "9\n"


@needs_sqlite3
async def test_sqlite3_instances_keep_their_own_databases() -> None:
    async with ToolPool("sqlite3", size=2, prompt="sqlite> ") as tools:
        a, b = tools.instances
        assert await a.run("create table t(x); insert into t values (42);") == ""
        assert await a.run("select x from t;") == "42\n"
        assert "no such table" in await b.run("select x from t;")


@needs_bc
@pytest.mark.parametrize("mode", MODES)
async def test_bc_without_a_prompt_reads_to_a_marker(mode: str) -> None:
    async with ToolPool("bc -q", size=2, mode=mode) as tools:
        one, two = tools.instances
        await one.send("scale=3; x=1/4")
        await two.send("x=7")
        await asyncio.gather(one.send("x"), two.send("x*6"))
        first, second = await asyncio.gather(one.read_until("\n"), two.read_until("\n"))
        assert (first.text, second.text) == (".250", "42")


async def test_the_pool_runs_a_line_on_any_free_instance_and_reports_every_status() -> None:
    async with ToolPool(REPL, size=2, prompt=PROMPT, name="calc") as tools:
        assert await asyncio.gather(tools.run("6*7"), tools.run("6*7")) == ["42\n", "42\n"]
        statuses = await tools.status()
        assert [s.session_id for s in statuses] == ["calc-0", "calc-1"]
        assert all(s.alive and s.bytes_in == len("6*7\n") for s in statuses)
        assert "2 instances" in repr(tools) and "open" in repr(tools)


async def test_run_without_a_prompt_is_a_usage_error() -> None:
    async with ToolPool(REPL, size=1) as tools:
        with pytest.raises(ValueError, match="prompt"):
            await tools.instances[0].run("1")


async def test_send_never_blocks_on_a_program_that_is_not_reading() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT, mode="pipes") as tools:
        repl = tools.instances[0]
        await repl.send("import time; print('asleep', flush=True); time.sleep(60)")
        assert (await repl.read_until("asleep\n", timeout=10)).matched
        big = "x = '" + "a" * 1_000_000 + "'"
        assert await repl.send(big) == len(big) + 1  # queued, far past any pipe buffer
        status = await repl.status()
        assert status.pending_input > 0  # the program has not taken it yet
        await repl.interrupt()
        assert "KeyboardInterrupt" in (await repl.read_until(timeout=10)).text
        assert (await repl.read_until(timeout=30)).matched  # the prompt after the long line
        assert await repl.run("len(x)", timeout=30) == "1000000\n"
        assert (await repl.status()).pending_input == 0


# --- liveness at lease time, and what a timed-out run() last saw ---------------------


async def _wait_exited(pid: int) -> None:
    """Until ``pid`` has ended (a zombie or gone), woken by the process itself."""
    with contextlib.suppress(psutil.NoSuchProcess):
        await asyncio.to_thread(psutil.Process(pid).wait, 10)


async def test_a_program_killed_while_not_leased_is_restarted_before_the_next_lease() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        async with tools.instance() as repl:
            await repl.run("state = 'kept'")
            old_pid = (await repl.status()).pid
        os.kill(old_pid, signal.SIGKILL)  # no call since: nothing on the pool side knows
        await _wait_exited(old_pid)
        async with tools.instance() as repl:
            assert not repl.needs_restart
            assert await repl.run("1") == "1\n"  # handed out alive, not dead
            status = await repl.status()
            assert status.pid != old_pid and status.restarts == 1
            assert "NameError" in await repl.run("state")


async def test_a_live_program_is_handed_out_as_it_is() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        async with tools.instance() as repl:
            await repl.run("state = 'kept'")
        async with tools.instance() as repl:
            assert await repl.run("state") == "'kept'\n"
            assert (await repl.status()).restarts == 0


@needs_sqlite3
async def test_a_sqlite3_statement_without_its_semicolon_times_out_saying_what_it_printed() -> None:
    async with ToolPool("sqlite3", size=1, prompt="sqlite> ") as tools:
        sqlite = tools.instances[0]
        with pytest.raises(ToolTimeout) as caught:
            await sqlite.run("select 1", timeout=1)
        message = str(caught.value)
        assert "...>" in message  # sqlite3's continuation prompt: it waits for the ';'
        assert "last printed" in message
        assert await sqlite.run(";") == "1\n"  # the statement completes; nothing lost


@needs_bc
async def test_bc_killed_between_leases_is_restarted_at_the_next_lease() -> None:
    async with ToolPool("bc -q", size=1) as tools:
        async with tools.instance() as bc:
            await bc.send("x=6")
            old_pid = (await bc.status()).pid
        os.kill(old_pid, signal.SIGKILL)
        await _wait_exited(old_pid)
        async with tools.instance() as bc:
            await bc.send("7*6")
            assert (await bc.read_until("\n")).text == "42"
            assert (await bc.status()).restarts == 1


async def test_a_run_timeout_says_when_the_program_printed_nothing() -> None:
    async with ToolPool(REPL, size=1, prompt=PROMPT) as tools:
        with pytest.raises(ToolTimeout) as caught:
            await tools.instances[0].run("import time; time.sleep(3)", timeout=0.5)
        assert "printed nothing" in str(caught.value)
