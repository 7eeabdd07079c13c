"""Retry backoff (exponential, jittered, capped) and the per-pool retry budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import RetryPolicy
from corral._retry import RetryBudget


@given(retry=st.integers(0, 200), draw=st.floats(0, 1, exclude_max=True))
def test_backoff_is_jittered_below_a_doubling_ceiling_and_capped(retry: int, draw: float) -> None:
    policy = RetryPolicy(backoff=0.05, backoff_max=2.0)
    wait = policy.backoff_for(retry, draw)
    assert 0 <= wait <= min(2.0, 0.05 * 2.0 ** min(retry, 60))


def test_backoff_doubles_per_retry() -> None:
    policy = RetryPolicy(backoff=0.1, backoff_max=100.0)
    assert [policy.backoff_for(n, 0.5) for n in range(4)] == pytest.approx([0.05, 0.1, 0.2, 0.4])


def test_the_budget_keeps_retries_a_fraction_of_calls() -> None:
    budget = RetryBudget(RetryPolicy(budget_ratio=0.1, budget_min=2, budget_window=10.0))
    for _ in range(100):
        budget.called(1.0)
    granted = sum(budget.try_retry(1.0) for _ in range(100))
    assert granted == 2 + 10  # the floor plus 10% of 100 calls


def test_the_budget_refills_as_the_window_moves_on() -> None:
    budget = RetryBudget(RetryPolicy(budget_ratio=0.0, budget_min=1, budget_window=10.0))
    assert budget.try_retry(0.0)
    assert not budget.try_retry(5.0)
    assert budget.try_retry(10.5)


@pytest.mark.parametrize(
    "changes",
    [{"backoff": 0}, {"backoff_max": -1}, {"budget_ratio": 2}, {"budget_min": -1}],
)
def test_bad_retry_settings_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        RetryPolicy(**changes)  # type: ignore[arg-type]
