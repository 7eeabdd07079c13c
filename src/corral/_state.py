"""The worker state machine: one transition table, illegal moves raise.

Owns: the states a worker handle goes through and which moves between them are
legal. Must not touch: processes, I/O or counters; the pool derives its counts
from the states held here, never keeps them on the side.

    STARTING -> READY <-> BUSY -> DRAINING -> STOPPING -> DEAD
    any state -> STOPPING (evicted or closing) and -> DEAD (the process ended)
"""

from __future__ import annotations

import enum

__all__ = ["IllegalTransition", "WorkerState", "check_transition"]


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, handshake not yet received
    READY = "ready"  # serving, no call in flight
    BUSY = "busy"  # serving, at least one call in flight or leased
    DRAINING = "draining"  # takes no new calls; stops once idle
    STOPPING = "stopping"  # being shut down or killed
    DEAD = "dead"  # the process has ended and been reaped

    # Plain attributes, set below (read on every call, so not properties):
    accepting: bool  # whether new calls may be placed on a worker in this state
    live: bool  # whether the worker's process may still be running


for _member in WorkerState:
    _member.accepting = _member in (WorkerState.READY, WorkerState.BUSY)
    _member.live = _member is not WorkerState.DEAD
del _member


_S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    _S.STARTING: frozenset({_S.READY, _S.STOPPING, _S.DEAD}),
    _S.READY: frozenset({_S.BUSY, _S.DRAINING, _S.STOPPING, _S.DEAD}),
    _S.BUSY: frozenset({_S.READY, _S.DRAINING, _S.STOPPING, _S.DEAD}),
    _S.DRAINING: frozenset({_S.STOPPING, _S.DEAD}),
    _S.STOPPING: frozenset({_S.DEAD}),
    _S.DEAD: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A worker was asked to move between two states that are not connected."""


def check_transition(current: WorkerState, new: WorkerState) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"worker cannot go from {current.value} to {new.value}")
