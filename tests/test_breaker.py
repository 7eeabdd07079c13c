"""The circuit breaker as a state machine: random outcomes, a random clock, fixed promises.

The breaker is pure (every method takes ``now``), so hypothesis drives it with a
fake clock. The promises checked after every step:

- no call passes an open breaker: while open, ``admit`` refuses until the
  cool-down is over, and then only probes pass, never more at once than
  ``probes``;
- ``ADMIT`` (an ordinary call) only ever comes from a closed breaker;
- whatever happened before, once the pool is healthy again the breaker is
  closed after at most one cool-down and ``probes`` successful probes.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral import BreakerConfig
from corral._breaker import ADMIT, PROBE, REJECT, BreakerState, CircuitBreaker, Transition


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.transitions: list[Transition] = []
        self.breaker: CircuitBreaker | None = None
        self.outstanding: list[int] = []  # admissions not yet recorded

    @rule(
        rate=st.sampled_from([0.1, 0.5, 1.0]),
        min_calls=st.integers(1, 5),
        probes=st.integers(1, 3),
        cooldown=st.sampled_from([0.5, 5.0]),
    )
    @precondition(lambda self: self.breaker is None)
    def configure(self, rate: float, min_calls: int, probes: int, cooldown: float) -> None:
        config = BreakerConfig(
            failure_rate=rate, window=10.0, min_calls=min_calls, cooldown=cooldown, probes=probes
        )
        self.breaker = CircuitBreaker(
            config, name="p", on_transition=lambda b, t: self.transitions.append(t)
        )

    @rule(dt=st.floats(0, 12, allow_nan=False))
    @precondition(lambda self: self.breaker is not None)
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    @precondition(lambda self: self.breaker is not None)
    def request(self) -> None:
        breaker = self.breaker
        assert breaker is not None
        before = breaker.state
        opened_at = breaker.opened_at
        inflight = breaker.probes_inflight
        answer = breaker.admit(self.now)
        if before is BreakerState.OPEN and self.now < opened_at + breaker.config.cooldown:
            assert answer == REJECT, "a call passed an open breaker before its cool-down"
        if answer == ADMIT:
            assert before is BreakerState.CLOSED
        if answer == PROBE:
            assert breaker.state is BreakerState.HALF_OPEN
            assert inflight < breaker.config.probes
        if answer != REJECT:
            self.outstanding.append(answer)

    @rule(data=st.data(), outcome=st.sampled_from([True, False, None]))
    @precondition(lambda self: self.breaker is not None and self.outstanding)
    def finish(self, data: st.DataObject, outcome: bool | None) -> None:
        assert self.breaker is not None
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        answer = self.outstanding.pop(i)
        self.breaker.record(self.now, outcome, answer == PROBE)

    @rule()
    @precondition(lambda self: self.breaker is not None)
    def pool_heals(self) -> None:
        """From any state: every call succeeds from now on; the breaker must close."""
        breaker = self.breaker
        assert breaker is not None
        for answer in self.outstanding:
            breaker.record(self.now, False, answer == PROBE)
        self.outstanding.clear()
        self.now += breaker.config.cooldown  # one cool-down at most
        for _ in range(breaker.config.probes):
            answer = breaker.admit(self.now)
            assert answer in (ADMIT, PROBE), f"healed pool refused after a cool-down: {breaker}"
            breaker.record(self.now, False, answer == PROBE)
        assert breaker.state is BreakerState.CLOSED
        assert breaker.admit(self.now) == ADMIT
        breaker.record(self.now, False)

    @invariant()
    def probes_are_bounded(self) -> None:
        breaker = self.breaker
        if breaker is None:
            return
        assert breaker.probes_inflight >= 0
        if breaker.state is BreakerState.HALF_OPEN:
            assert breaker.probes_inflight <= breaker.config.probes

    @invariant()
    def transitions_are_legal(self) -> None:
        legal = {
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        }
        for t in self.transitions:
            assert (t.source, t.target) in legal, t
        for a, b in zip(self.transitions, self.transitions[1:], strict=False):
            assert a.target is b.source


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def test_opens_on_the_failure_rate_once_enough_calls_were_seen() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_rate=0.5, min_calls=4, window=10.0))
    for failed in (True, True, True):
        assert breaker.admit(0.0) == ADMIT
        breaker.record(0.0, failed)
    assert breaker.state is BreakerState.CLOSED  # 3 calls < min_calls
    breaker.record(0.1, False)
    assert breaker.state is BreakerState.CLOSED  # not yet judged: the last was a success
    breaker.record(0.2, True)
    assert breaker.state is BreakerState.OPEN  # 4 of 5 failed


def test_old_failures_leave_the_window() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_rate=0.5, min_calls=4, window=10.0))
    for _ in range(3):
        breaker.record(0.0, True)
    for _ in range(4):
        breaker.record(11.0, False)  # the failures are a window old
    breaker.record(11.0, True)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.window_counts(11.0) == (5, 1)


def test_open_refuses_until_the_cooldown_then_lets_probes_through() -> None:
    breaker = CircuitBreaker(BreakerConfig(min_calls=1, cooldown=5.0, probes=2))
    breaker.record(0.0, True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit(4.99) == REJECT
    assert breaker.retry_after(4.0) == pytest.approx(1.0)
    assert breaker.admit(5.0) == PROBE
    assert breaker.admit(5.0) == PROBE
    assert breaker.admit(5.0) == REJECT  # two probes out already
    breaker.record(5.1, False, probe=True)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(5.2, False, probe=True)
    assert breaker.state is BreakerState.CLOSED


def test_a_failed_probe_opens_again_for_a_full_cooldown() -> None:
    breaker = CircuitBreaker(BreakerConfig(min_calls=1, cooldown=5.0))
    breaker.record(0.0, True)
    assert breaker.admit(6.0) == PROBE
    breaker.record(7.0, True, probe=True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.admit(11.9) == REJECT
    assert breaker.admit(12.0) == PROBE


def test_a_probe_that_says_nothing_frees_its_slot() -> None:
    breaker = CircuitBreaker(BreakerConfig(min_calls=1, cooldown=1.0))
    breaker.record(0.0, True)
    assert breaker.admit(1.0) == PROBE
    breaker.record(1.0, None, probe=True)  # cancelled: neither success nor failure
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit(1.0) == PROBE


def test_history_records_each_transition_with_its_reason() -> None:
    breaker = CircuitBreaker(BreakerConfig(min_calls=2, cooldown=1.0))
    breaker.record(0.0, True)
    breaker.record(0.0, True)
    breaker.admit(1.0)
    breaker.record(1.0, False, probe=True)
    kinds = [(t.source.value, t.target.value) for t in breaker.history]
    assert kinds == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert breaker.history[0].reason == "2 of 2 calls failed"


@pytest.mark.parametrize(
    "changes",
    [
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"window": 0},
        {"cooldown": float("inf")},
        {"min_calls": 0},
        {"probes": 0},
        {"probes": 1.5},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        BreakerConfig(**changes)  # type: ignore[arg-type]


def test_a_breaker_that_says_retry_now_admits_now() -> None:
    """retry_after() and admit() read the cool-down the same way, to the last bit.

    Opened at 1021.433023386080185 with a 5 s cool-down: at opened_at + 5,
    ``now - opened_at`` rounds to just under 5 while ``opened_at + 5 - now``
    is 0, so a breaker that subtracted one way and compared the other refused a
    call it had just said could go (found by the state machine above).
    """
    breaker = CircuitBreaker(
        BreakerConfig(failure_rate=0.1, window=10.0, min_calls=1, cooldown=5.0, probes=1),
        name="p",
    )
    opened_at = 1020.0 + 1.433023386080185
    breaker.record(opened_at, True)
    assert breaker.state is BreakerState.OPEN
    now = opened_at + breaker.config.cooldown
    assert breaker.retry_after(now) == 0.0
    assert breaker.admit(now) == PROBE
