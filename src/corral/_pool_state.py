"""The pool's own state machine: one transition table, illegal moves raise.

Owns: the pool's lifecycle state (``PoolLifecycle``), which moves between
states are legal, and the fork generation the pool was made in (a forked child
of the pool's process must not use it). Must not touch: workers, callers or
I/O; every other part of the pool reads the state from here, none keeps its own.

    NEW -> STARTING -> OPEN -> CLOSING -> CLOSED
    NEW -> CLOSED (closed before it started); STARTING -> CLOSING (start failed
    or closed while starting); OPEN -> CLOSED (the event loop ended, unclosed)
"""

from __future__ import annotations

import asyncio
import enum
import os

from ._errors import PoolClosed

__all__ = [
    "TRANSITIONS",
    "IllegalPoolTransition",
    "PoolLifecycle",
    "PoolState",
    "fork_generation",
]


class PoolState(enum.Enum):
    NEW = "new"  # built, not started
    STARTING = "starting"  # start() is starting the first workers
    OPEN = "open"  # takes calls
    CLOSING = "closing"  # aclose() runs: refuses calls, drains, stops workers
    CLOSED = "closed"  # no worker left


_S = PoolState
TRANSITIONS: dict[PoolState, frozenset[PoolState]] = {
    _S.NEW: frozenset({_S.STARTING, _S.CLOSED}),
    _S.STARTING: frozenset({_S.OPEN, _S.CLOSING}),
    _S.OPEN: frozenset({_S.CLOSING, _S.CLOSED}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class IllegalPoolTransition(RuntimeError):
    """The pool was asked to move between two states that are not connected."""


_generation = 0


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_generation() -> int:
    """How many forks separate this process from the first (0 in the original)."""
    return _generation


class PoolLifecycle:
    """One pool's state, and whether this process is the one that made the pool."""

    __slots__ = ("_generation", "loop", "name", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = PoolState.NEW
        self._generation = _generation
        # The loop it was started on, kept: asyncio.get_running_loop() makes a
        # getpid() system call on each use (Python 3.11), which a call must not.
        self.loop: asyncio.AbstractEventLoop | None = None

    def move(self, new: PoolState) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise IllegalPoolTransition(
                f"pool {self.name} cannot go from {self.state.value} to {new.value}"
            )
        self.state = new

    def begin_start(self, loop: asyncio.AbstractEventLoop) -> None:
        """NEW -> STARTING on ``loop``; PoolClosed if the pool was started before."""
        if self.state is not PoolState.NEW:
            raise PoolClosed(f"pool {self.name} was already started")
        self.loop = loop
        self.state = PoolState.STARTING

    def finish_start(self) -> None:
        """STARTING -> OPEN; PoolClosed if the pool was closed while it started."""
        if self.state is not PoolState.STARTING:
            raise PoolClosed(f"pool {self.name} was closed while it started")
        self.state = PoolState.OPEN

    @property
    def open(self) -> bool:
        """Open, and in the process that started it."""
        return self.state is PoolState.OPEN and self._generation == _generation

    @property
    def forked_away(self) -> bool:
        """True in a forked child of the process that made the pool."""
        return self._generation != _generation

    def check_fork(self) -> None:
        if self._generation != _generation:
            raise PoolClosed(
                f"pool {self.name} was started in the parent of this forked process; a "
                "forked child cannot use it (its workers and pipes belong to the parent). "
                "Create the pool in the child, after the fork."
            )

    def check_open(self) -> None:
        self.check_fork()
        state = self.state
        if state is not PoolState.OPEN:
            raise PoolClosed(
                f"pool {self.name} is {'not started' if state is PoolState.NEW else state.value}"
            )
