"""The pool's own state machine: a transition table, and the moves the Pool makes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import corral
from corral import Pool
from corral._pool_state import TRANSITIONS, IllegalPoolTransition, PoolLifecycle, PoolState

TARGET = "tests.workers.basic:app"


@given(st.sampled_from(PoolState), st.sampled_from(PoolState))
def test_only_the_moves_in_the_table_are_legal(current: PoolState, new: PoolState) -> None:
    lifecycle = PoolLifecycle("p")
    lifecycle.state = current
    if new is current or new in TRANSITIONS[current]:
        lifecycle.move(new)
        assert lifecycle.state is new
    else:
        with pytest.raises(IllegalPoolTransition):
            lifecycle.move(new)
        assert lifecycle.state is current


def test_closed_is_final_and_every_state_reaches_it() -> None:
    assert TRANSITIONS[PoolState.CLOSED] == frozenset()
    for state in PoolState:
        seen, frontier = {state}, [state]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert PoolState.CLOSED in seen


def test_only_an_open_pool_takes_calls() -> None:
    lifecycle = PoolLifecycle("p")
    for state in PoolState:
        lifecycle.state = state
        assert lifecycle.open is (state is PoolState.OPEN)
        if state is not PoolState.OPEN:
            with pytest.raises(corral.PoolClosed):
                lifecycle.check_open()


async def test_a_pool_goes_through_its_states_in_order() -> None:
    pool = Pool(TARGET, size=1)
    assert pool.status().state == "new"
    await pool.start()
    assert pool.status().state == "open"
    with pytest.raises(corral.PoolClosed, match="already started"):
        await pool.start()
    await pool.aclose()
    assert pool.status().state == "closed"
    with pytest.raises(corral.PoolClosed, match="closed"):
        await pool.call("add", 1, 1)


async def test_a_pool_closed_while_it_starts_does_not_open() -> None:
    import asyncio

    pool = Pool(TARGET, size=1)
    starting = asyncio.ensure_future(pool.start())
    await asyncio.sleep(0)  # start() is launching the first worker
    assert pool.status().state == "starting"
    await pool.aclose()
    with pytest.raises((corral.PoolClosed, asyncio.CancelledError, corral.WorkerStartError)):
        await starting
    assert pool.status().state == "closed"
    assert pool.workers == ()
