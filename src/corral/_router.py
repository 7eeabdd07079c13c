"""Placement: which worker takes a call. Pure functions, no I/O, no mutation.

Owns: the placement rules, in one place, numbered (see docs/decisions/0004):
  1. A worker can take a call when it is accepting (ready or busy), is not
     leased by a checkout, has no unacknowledged Cancel, and has a free slot
     (fewer than ``max_concurrency`` calls in flight); a checkout needs it idle.
  2. A plain call goes to the worker with the fewest calls in flight; ties go to
     the earliest worker, so a lightly loaded pool reuses warm workers.
  3. A new session goes to the accepting worker holding the fewest sessions,
     ties broken by calls in flight, so sessions spread even on an idle pool;
     a worker already holding ``max_sessions_per_worker`` takes no new one.
  4. A known session goes only to the worker that holds it (the pool waits for it).
  5. While a checkout waits and no worker is idle, the accepting worker with the
     fewest calls in flight is claimed: it takes no new calls, drains, and goes
     to the checkout, so a stream of plain calls cannot starve checkouts.
Must not touch: queues, futures or processes; the pool acts on what these return.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Protocol, TypeVar

from ._state import WorkerState

__all__ = ["Placeable", "can_take", "can_claim", "pick_claim", "pick_for_call", "pick_session_home"]


class Placeable(Protocol):
    @property
    def state(self) -> WorkerState: ...
    @property
    def inflight(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def leased(self) -> bool: ...
    @property
    def unacked_cancels(self) -> int: ...
    @property
    def claimed(self) -> bool: ...
    @property
    def sessions(self) -> Sized: ...


W = TypeVar("W", bound=Placeable)


def can_take(worker: Placeable, exclusive: bool) -> bool:
    """Rule 1."""
    if not worker.state.accepting or worker.leased or worker.unacked_cancels:
        return False
    if exclusive:
        return worker.inflight == 0
    return not worker.claimed and worker.inflight < worker.max_concurrency


def pick_for_call(workers: Iterable[W], exclusive: bool = False) -> W | None:
    """Rule 2 (and the idle worker for a checkout): None means wait."""
    best: W | None = None
    least = 0
    for worker in workers:
        if can_take(worker, exclusive):
            load = worker.inflight
            if load == 0:
                return worker
            if best is None or load < least:
                best, least = worker, load
    return best


def pick_session_home(workers: Iterable[W], max_sessions: int | None = None) -> W | None:
    """Rule 3: None when no accepting worker has room for another session."""
    best: W | None = None
    best_key = (0, 0)
    for worker in workers:
        if not worker.state.accepting:
            continue
        held = len(worker.sessions)
        if max_sessions is not None and held >= max_sessions:
            continue
        key = (held, worker.inflight)
        if best is None or key < best_key:
            best, best_key = worker, key
    return best


def can_claim(worker: Placeable) -> bool:
    return worker.state.accepting and not worker.leased


def pick_claim(workers: Iterable[W]) -> W | None:
    """Rule 5: the worker to drain for a waiting checkout (None if none is accepting)."""
    best: W | None = None
    for worker in workers:
        if can_claim(worker) and (best is None or worker.inflight < best.inflight):
            best = worker
    return best
