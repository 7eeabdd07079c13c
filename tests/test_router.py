"""Placement rules (pure functions) and the worker state machine, property-based."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import _router
from corral._state import TRANSITIONS, IllegalTransition, WorkerState, check_transition


@dataclass
class FakeWorker:
    state: WorkerState
    inflight: int
    max_concurrency: int
    leased: bool
    unacked_cancels: int
    claimed: bool
    sessions: set[str] = field(default_factory=set)


workers_strategy = st.lists(
    st.builds(
        FakeWorker,
        state=st.sampled_from(list(WorkerState)),
        inflight=st.integers(0, 8),
        max_concurrency=st.integers(1, 8),
        leased=st.booleans(),
        unacked_cancels=st.integers(0, 2),
        claimed=st.booleans(),
        sessions=st.sets(st.text(max_size=3), max_size=5),
    ),
    max_size=8,
)


@given(workers_strategy, st.booleans())
def test_a_call_goes_to_a_worker_that_can_take_it_with_the_fewest_in_flight(
    workers: list[FakeWorker], exclusive: bool
) -> None:
    chosen = _router.pick_for_call(workers, exclusive)
    able = [w for w in workers if _router.can_take(w, exclusive)]
    if not able:
        assert chosen is None
        return
    assert chosen is not None and _router.can_take(chosen, exclusive)
    assert chosen.inflight == min(w.inflight for w in able)


@given(workers_strategy)
def test_rule_1_what_can_take_a_call(workers: list[FakeWorker]) -> None:
    for w in workers:
        plain = _router.can_take(w, exclusive=False)
        assert plain == (
            w.state.accepting
            and not w.leased
            and not w.unacked_cancels
            and not w.claimed
            and w.inflight < w.max_concurrency
        )
        if _router.can_take(w, exclusive=True):
            assert w.inflight == 0 and w.state.accepting and not w.leased


@given(workers_strategy)
def test_a_new_session_goes_to_the_accepting_worker_with_fewest_sessions(
    workers: list[FakeWorker],
) -> None:
    home = _router.pick_session_home(workers)
    accepting = [w for w in workers if w.state.accepting]
    if not accepting:
        assert home is None
        return
    assert home is not None and home.state.accepting
    best = min((len(w.sessions), w.inflight) for w in accepting)
    assert (len(home.sessions), home.inflight) == best


@given(workers_strategy)
def test_a_claim_picks_an_accepting_unleased_worker(workers: list[FakeWorker]) -> None:
    claim = _router.pick_claim(workers)
    candidates = [w for w in workers if _router.can_claim(w)]
    if not candidates:
        assert claim is None
    else:
        assert claim is not None and claim.inflight == min(w.inflight for w in candidates)


@pytest.mark.parametrize("current", list(WorkerState))
@pytest.mark.parametrize("new", list(WorkerState))
def test_only_the_transitions_in_the_table_are_legal(
    current: WorkerState, new: WorkerState
) -> None:
    if new in TRANSITIONS[current]:
        check_transition(current, new)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(current, new)


def test_dead_is_final_and_every_state_can_die() -> None:
    assert TRANSITIONS[WorkerState.DEAD] == frozenset()
    for state in WorkerState:
        if state is not WorkerState.DEAD:
            assert WorkerState.DEAD in TRANSITIONS[state]
