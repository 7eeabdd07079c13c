"""Retries: exponential backoff with jitter, and a budget that keeps them a minority.

Owns: how long to wait before retry number n (``RetryPolicy.backoff``) and
whether a pool may take one more retry now (``RetryBudget``). Must not touch:
clocks, sleeping, pools or logging; callers pass ``now`` and a random number,
so both are pure and tested with a fake clock.

A budget, not just a count per call: when a pool fails, every caller retries,
and per-call counts multiply the load on a pool that is already sick. The
budget lets retries be at most ``ratio`` of the calls over the last ``window``
seconds (plus ``min_per_window``, so a quiet pool can still retry).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetryBudget", "RetryPolicy"]

_BUCKETS = 10


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a workload retries a call that failed without running. Times in seconds.

    The wait before retry ``n`` (0-based) is drawn uniformly from
    ``[0, min(backoff_max, backoff * 2**n)]`` ("full jitter": callers that
    failed together do not come back together).
    """

    #: First backoff ceiling; it doubles per retry.
    backoff: float = 0.05
    #: The most a single backoff may be.
    backoff_max: float = 2.0
    #: Retries may be at most this fraction of the calls a pool took in the window...
    budget_ratio: float = 0.2
    #: ...plus this many per window, so a quiet pool may still retry.
    budget_min: int = 10
    #: The window the budget is counted over.
    budget_window: float = 10.0

    def __post_init__(self) -> None:
        for name in ("backoff", "backoff_max", "budget_window"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 <= self.budget_ratio <= 1:
            raise ValueError(f"budget_ratio must be in [0, 1], got {self.budget_ratio!r}")
        if not isinstance(self.budget_min, int) or self.budget_min < 0:
            raise ValueError(f"budget_min must be an int >= 0, got {self.budget_min!r}")

    def backoff_for(self, retry: int, draw: float) -> float:
        """The wait before retry number ``retry`` (0-based), given ``draw`` in [0, 1)."""
        ceiling = self.backoff * (2.0 ** min(retry, 60))
        return min(self.backoff_max, ceiling) * draw


class RetryBudget:
    """One pool's retry budget over a sliding window of ``_BUCKETS`` buckets."""

    __slots__ = ("_calls", "_index", "_min", "_ratio", "_retries", "_width")

    def __init__(self, policy: RetryPolicy) -> None:
        self._ratio = policy.budget_ratio
        self._min = policy.budget_min
        self._width = policy.budget_window / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._index = 0

    def called(self, now: float) -> None:
        """A call (first attempt) went to the pool."""
        index = int(now / self._width)
        if index != self._index:
            self._advance(index)
        self._calls[index % _BUCKETS] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it now; False leaves it untouched."""
        index = int(now / self._width)
        if index != self._index:
            self._advance(index)
        if sum(self._retries) >= self._min + self._ratio * sum(self._calls):
            return False
        self._retries[index % _BUCKETS] += 1
        return True

    def _advance(self, index: int) -> None:
        if index <= self._index:
            return
        if index - self._index >= _BUCKETS:
            self._calls = [0] * _BUCKETS
            self._retries = [0] * _BUCKETS
        else:
            for i in range(self._index + 1, index + 1):
                self._calls[i % _BUCKETS] = 0
                self._retries[i % _BUCKETS] = 0
        self._index = index
