"""An async handler's first step, run by the main thread when the loop is idle.

A handler that never suspends ends there, with no hand-over to the loop thread;
one that suspends goes on as a task of the worker's loop, on the loop thread
(decision 0028). Either way it is one asyncio task: the same loop, the same
task, its context, its cancellation, its deadline and its errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.async_steps:app"


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with Pool(TARGET, size=1, max_concurrency=2, cancel_grace=5.0) as pool:
        yield pool


async def test_an_async_handler_that_does_not_suspend_runs_on_the_main_thread(
    pool: Pool,
) -> None:
    # No hand-over to the loop thread: the main thread ran it whole, as a task
    # of the worker's loop (the loop is idle between sequential calls).
    seen = [await pool.call("no_await") for _ in range(5)]
    assert {where["thread"] for where in seen} == {"MainThread"}
    assert len({where["loop"] for where in seen}) == 1
    assert all(where["task"] != id(None) for where in seen)


@pytest.mark.parametrize(
    ("method", "args"), [("across_a_real_await", (0.01,)), ("across_a_bare_yield", ())]
)
async def test_a_handler_that_suspends_goes_on_as_the_same_task_on_the_loop_thread(
    pool: Pool, method: str, args: tuple[object, ...]
) -> None:
    first, after = await pool.call(method, *args)
    assert first["thread"] == "MainThread"
    assert after["thread"] == "corral-async"
    assert after["loop"] == first["loop"]
    assert after["task"] == first["task"]


async def test_a_future_the_loop_sets_after_the_first_step_is_awaited(pool: Pool) -> None:
    assert await pool.call("awaits_a_future_set_by_the_loop") == "set by the loop"


@pytest.mark.parametrize(
    ("method", "remote_type"),
    [("fails_at_once", "ValueError"), ("fails_after_an_await", "KeyError")],
)
async def test_an_exception_in_or_after_the_first_step_is_a_remote_error(
    pool: Pool, method: str, remote_type: str
) -> None:
    with pytest.raises(corral.RemoteError) as info:
        await pool.call(method, "broken here")
    assert info.value.type == remote_type
    assert "broken here" in str(info.value)
    assert f"in {method}" in info.value.traceback
    assert await pool.call("no_await")  # the worker serves on
    assert pool.stats().restarts == 0


async def test_a_handler_cancelled_while_suspended_sees_the_cancel(pool: Pool) -> None:
    call = asyncio.ensure_future(pool.call("suspends_until_cancelled"))
    await asyncio.sleep(0)  # sent before the probe below, which blocks the main thread
    assert pool.stats().inflight == 1
    assert await pool.call("wait_until_suspended", 5.0, session="probe") is True
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await pool.call("saw_the_cancel", 5.0) is True
    await pool.wait_idle(timeout=5)
    assert pool.stats().restarts == 0


async def test_a_context_variable_set_in_the_first_step_is_seen_after_the_hand_over(
    pool: Pool,
) -> None:
    assert await pool.call("var_across_an_await", "first step") == ["first step", "corral-async"]
    assert await pool.call("read_var") == "unset"  # each call has a context of its own


async def test_a_sync_handlers_context_variables_do_not_reach_async_handlers(pool: Pool) -> None:
    assert await pool.call("set_var_in_sync_handler", "sync") == "sync"
    assert await pool.call("read_var") == "unset"


async def test_work_scheduled_by_a_first_step_that_ends_still_runs(pool: Pool) -> None:
    # The main thread ran the handler whole; the loop must still be woken for
    # what it scheduled (the sync handlers below block the main thread).
    await pool.call("spawns_and_returns")
    assert await pool.call("background_ran", 5.0) is True
    await pool.call("schedules_a_timer_and_returns", 0.01)
    assert await pool.call("timer_fired", 5.0) is True


async def test_an_async_handler_past_its_deadline_times_out(pool: Pool) -> None:
    # Suspended: its deadline timer stops it. Blocked in its first step: its
    # result comes too late and is a timeout.
    with pytest.raises(corral.CallTimeout):
        await pool.call("sleeps", 30, timeout=0.2)
    with pytest.raises(corral.CallTimeout):
        await pool.call("blocks_in_its_first_step", 0.3, timeout=0.1)
    await pool.wait_idle(timeout=5)
    assert await pool.call("sleeps", 0.001, timeout=5) == "slept"
    assert pool.stats().restarts == 0


async def test_an_async_stream_that_suspends_between_items_streams_them_all(pool: Pool) -> None:
    assert [i async for i in pool.stream("counts", 7)] == list(range(7))


async def test_sync_handlers_in_the_same_app_stay_on_the_main_thread(pool: Pool) -> None:
    await pool.call("across_a_real_await", 0.001)
    assert await pool.call("sync_thread") == "MainThread"


async def test_under_an_event_loop_policy_of_the_apps_own_every_call_is_handed_over() -> None:
    async with Pool("tests.workers.async_steps_own_policy:app", size=1) as pool:
        seen = [await pool.call("no_await") for _ in range(3)]
        assert {where["thread"] for where in seen} == {"corral-async"}
        first, after = await pool.call("across_a_real_await", 0.001)
        assert first["thread"] == after["thread"] == "corral-async"
        with pytest.raises(corral.RemoteError):
            await pool.call("fails_at_once", "handed over")
