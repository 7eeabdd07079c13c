"""Circuit breakers: closed -> open -> half-open -> closed, as a pure state machine.

Owns: the breaker's states, when it moves between them, and the knobs that say
so (``BreakerConfig``). Must not touch: clocks, pools, logging or the event loop.
Every method takes ``now`` (any monotonic clock, in seconds) from its caller, so
tests drive it with a fake clock and the front (``_pools``) feeds it
``time.monotonic()``. Transitions are recorded in ``history`` and handed to an
optional ``on_transition`` callback; acting on them (logs, metrics) is the
caller's job.

    CLOSED --(failure rate >= failure_rate over window, >= min_calls)--> OPEN
    OPEN --(cooldown elapsed, at the next request)--> HALF_OPEN
    HALF_OPEN --(probes successes in a row)--> CLOSED
    HALF_OPEN --(any probe fails)--> OPEN (cool-down starts again)

While OPEN every request is refused; while HALF_OPEN at most ``probes`` requests
are in flight at once (the probes) and the rest are refused. The window is a
ring of ``_BUCKETS`` time buckets, so recording an outcome is O(1) and the rate
forgets old outcomes a bucket at a time.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ADMIT",
    "PROBE",
    "REJECT",
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "Transition",
]

_BUCKETS = 10
HISTORY_KEPT = 50

#: What ``admit`` answers: refuse, let through, or let through as a half-open probe.
REJECT = 0
ADMIT = 1
PROBE = 2


class BreakerState(enum.Enum):
    """Where a breaker is: ``closed`` lets calls through, ``open`` refuses them."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """When a pool's breaker opens and how it recovers. Times are in seconds.

    The defaults open a breaker when at least half of at least 10 calls failed
    within the last 10 s, keep it open 5 s, then let one probe through: long
    enough for a pool to restart a worker, short enough that a healed pool gets
    its traffic back quickly.
    """

    #: Fraction of failed calls (0 < rate <= 1) in the window that opens the breaker.
    failure_rate: float = 0.5
    #: The window the rate is measured over.
    window: float = 10.0
    #: Calls needed in the window before the rate counts (a single failure of a
    #: quiet pool does not open it).
    min_calls: int = 10
    #: How long the breaker stays open before it lets probes through.
    cooldown: float = 5.0
    #: Probes in flight at once while half-open, and successes needed to close.
    probes: int = 1
    #: One breaker per (pool, method) instead of one per pool: a method that
    #: crashes its workers stops being sent there while the others flow.
    per_method: bool = False
    #: Whether a ``RemoteError`` (the handler raised) counts as a failure. By
    #: default it does not: it is the caller's error, and the worker stays.
    count_remote_errors: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate!r}")
        for name in ("window", "cooldown"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("min_calls", "probes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class Transition:
    """One change of state: when (the breaker's clock), from, to, and why."""

    at: float
    source: BreakerState
    target: BreakerState
    reason: str


class CircuitBreaker:
    """One breaker. Call ``admit(now)`` before a call and ``record(...)`` after it.

    ``admit`` returns ``REJECT``, ``ADMIT`` or ``PROBE``; whatever it returned
    goes back to ``record`` (as ``probe=True`` for a probe) so a probe's slot is
    given back. ``record(now, None, probe)`` ends a call that says nothing about
    the pool (cancelled, or a caller's error): it frees a probe slot and counts
    nothing.
    """

    __slots__ = (
        "_calls",
        "_failures",
        "_index",
        "_min_calls",
        "_per_second",
        "_probe_successes",
        "_probes_inflight",
        "_rate",
        "config",
        "history",
        "name",
        "on_transition",
        "opened_at",
        "state",
    )

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        name: str = "",
        on_transition: Callable[[CircuitBreaker, Transition], None] | None = None,
    ) -> None:
        self.config = config or BreakerConfig()
        self.name = name
        self.on_transition = on_transition
        self.state = BreakerState.CLOSED
        self.opened_at = 0.0
        self.history: collections.deque[Transition] = collections.deque(maxlen=HISTORY_KEPT)
        self._rate = self.config.failure_rate
        self._min_calls = self.config.min_calls
        self._per_second = _BUCKETS / self.config.window  # buckets per second
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._index = 0  # the absolute number of the newest bucket
        self._probes_inflight = 0
        self._probe_successes = 0

    # --- the two calls of the hot path ----------------------------------------------

    def admit(self, now: float) -> int:
        """May a call go through now? ``ADMIT``, ``PROBE`` (half-open) or ``REJECT``."""
        state = self.state
        if state is BreakerState.CLOSED:
            return ADMIT
        if state is BreakerState.OPEN:
            if now < self.opened_at + self.config.cooldown:  # as retry_after() reads it
                return REJECT
            self._move(now, BreakerState.HALF_OPEN, "cool-down over")
        if self._probes_inflight >= self.config.probes:
            return REJECT
        self._probes_inflight += 1
        return PROBE

    def record(self, now: float, failed: bool | None, probe: bool = False) -> None:
        """The call ended: ``failed`` True (the pool's fault), False, or None (says nothing)."""
        if probe:
            self._probes_inflight -= 1
            if self.state is not BreakerState.HALF_OPEN or failed is None:
                return
            if failed:
                self._open(now, "a probe failed")
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.probes:
                n = self._probe_successes
                self._move(now, BreakerState.CLOSED, f"{n} probe{'s' if n > 1 else ''} succeeded")
            return
        if failed is None or self.state is not BreakerState.CLOSED:
            return  # a call admitted before the breaker opened tells nothing new
        index = int(now * self._per_second)
        if index != self._index:
            self._advance(index)
        slot = index % _BUCKETS
        self._calls[slot] += 1
        if failed:
            self._failures[slot] += 1
            calls = sum(self._calls)
            if calls >= self._min_calls:
                failures = sum(self._failures)
                if failures >= self._rate * calls:
                    self._open(now, f"{failures} of {calls} calls failed")

    def succeeded(self, now: float) -> None:
        """``record(now, False)`` for a call admitted while closed: the hot path's form."""
        if self.state is not BreakerState.CLOSED:
            return
        index = int(now * self._per_second)
        if index != self._index:
            self._advance(index)
        self._calls[index % _BUCKETS] += 1

    # --- reading ------------------------------------------------------------------------

    def retry_after(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.config.cooldown - now)

    def window_counts(self, now: float) -> tuple[int, int]:
        """``(calls, failures)`` counted in the window ending at ``now``."""
        self._advance(int(now * self._per_second))
        return sum(self._calls), sum(self._failures)

    @property
    def probes_inflight(self) -> int:
        """Probes let through and not yet recorded."""
        return self._probes_inflight

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name or '?'} {self.state.value}>"

    # --- moves ----------------------------------------------------------------------------

    def _advance(self, index: int) -> None:
        """Forget the buckets older than the window that ends in bucket ``index``."""
        if index <= self._index:
            return
        if index - self._index >= _BUCKETS:
            self._calls = [0] * _BUCKETS
            self._failures = [0] * _BUCKETS
        else:
            for i in range(self._index + 1, index + 1):
                self._calls[i % _BUCKETS] = 0
                self._failures[i % _BUCKETS] = 0
        self._index = index

    def _open(self, now: float, reason: str) -> None:
        self.opened_at = now
        self._move(now, BreakerState.OPEN, reason)

    def _move(self, now: float, target: BreakerState, reason: str) -> None:
        transition = Transition(now, self.state, target, reason)
        self.state = target
        self._probe_successes = 0
        if target is not BreakerState.HALF_OPEN:
            self._calls = [0] * _BUCKETS  # a fresh window after every open and close
            self._failures = [0] * _BUCKETS
        self.history.append(transition)
        if self.on_transition is not None:
            self.on_transition(self, transition)
