"""How the pool stops a worker through its shepherd, whichever way it was started.

Owns: the meaning of the signals sent to a shepherd (SIGTERM forwarded to the
worker's group, SIGUSR1 for "kill the group", SIGKILL for the shepherd itself)
and the lifeline whose closing also kills the group. Must not touch: how the
shepherd was started or how its pid may be signalled safely (each launched
worker says so in ``_signal``), or anything on the protocol pipes.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ShepherdControl"]


class ShepherdControl:
    """``terminate``/``kill``/``force_kill`` of a worker that runs under a shepherd.

    A subclass sets ``_lifeline`` (the write end of the shepherd's lifeline, or
    -1) and implements ``_signal``, sending a signal to the shepherd only while
    its pid is still its own.
    """

    _lifeline: int

    def _signal(self, sig: int) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        """Ask politely: the shepherd forwards SIGTERM to the worker's group."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker's whole group (by its shepherd)."""
        self._signal(signal.SIGUSR1)
        self._close_lifeline()  # the shepherd kills the group on lifeline EOF too

    def force_kill(self) -> None:
        """Last resort, when the shepherd itself does not end: SIGKILL it."""
        self._signal(signal.SIGKILL)

    def _close_lifeline(self) -> None:
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
