"""Sessions: which worker holds each session, which were lost, when each was used.

Owns: the session -> home worker map, each worker's own index of the sessions
it holds (``WorkerHandle.sessions``, written here alone and read by the
router), the sessions lost with their worker (and why, until a caller is told
once), and each session's last use (kept only when ``session_ttl`` is set).
Must not touch: waiting callers (the dispatcher), or a worker's process: ending
a session only asks the worker's handle to send ``EndSession``.
"""

from __future__ import annotations

import time
from collections.abc import ItemsView, Iterable

from . import _router
from ._errors import SessionLost
from ._handle import WorkerHandle
from ._log import Logger

__all__ = ["LOST_SESSIONS_KEPT", "Sessions"]

LOST_SESSIONS_KEPT = 10_000


class Sessions:
    """Every session of one pool, and the worker each is pinned to."""

    __slots__ = ("_homes", "_log", "_lost", "_max_per_worker", "_used")

    def __init__(
        self,
        log: Logger,
        ttl: float | None,
        max_per_worker: int | None,
    ) -> None:
        self._log = log
        self._homes: dict[str, WorkerHandle] = {}
        self._lost: dict[str, str] = {}  # session -> why, oldest first
        self._used: dict[str, float] | None = {} if ttl is not None else None
        self._max_per_worker = max_per_worker

    def __len__(self) -> int:
        return len(self._homes)

    def __getitem__(self, session: str) -> WorkerHandle:
        return self._homes[session]

    def get(self, session: str) -> WorkerHandle | None:
        """The worker holding ``session``, or None."""
        return self._homes.get(session)

    def items(self) -> ItemsView[str, WorkerHandle]:
        return self._homes.items()

    def place(self, session: str, workers: Iterable[WorkerHandle]) -> WorkerHandle | None:
        """The session's home, pinning a new session (router rule 3); None: no room now.

        Raises SessionLost, once, for a session whose worker died.
        """
        home = self._homes.get(session)
        if home is not None:
            return home
        why = self._lost.pop(session, None)
        if why is not None:
            raise SessionLost(f"session {session!r} is lost: {why}", session=session)
        home = _router.pick_session_home(workers, self._max_per_worker)
        if home is None:
            return None
        self._homes[session] = home
        home.sessions.add(session)
        self._log.info("session.opened", session=session, worker_id=home.id, pid=home.pid)
        return home

    def touch(self, session: str | None) -> None:
        """Note that a session is in use now (for session_ttl)."""
        if self._used is not None and session is not None:
            self._used[session] = time.monotonic()

    def told_lost(self, session: str | None) -> None:
        """A caller was told the session is lost: the next call starts it afresh."""
        self._lost.pop(session or "", None)

    def end(self, session: str) -> WorkerHandle | None:
        """Drop a session; returns the worker that held it (told to forget it)."""
        self._lost.pop(session, None)
        if self._used is not None:
            self._used.pop(session, None)
        worker = self._homes.pop(session, None)
        if worker is not None:
            worker.sessions.discard(session)
            worker.end_session(session)
        return worker

    def expired(self, now: float, ttl: float) -> list[str]:
        """Sessions unused for longer than ``ttl``."""
        if self._used is None:
            return []
        return [s for s, used in self._used.items() if now - used > ttl]

    def worker_left(self, worker: WorkerHandle, why: str) -> list[str]:
        """Forget the sessions of a worker that is gone; returns those now lost.

        A session whose loss its worker already reported to a call in flight is
        not recorded: that caller was told.
        """
        lost = []
        for session in worker.sessions:
            if self._homes.get(session) is worker:
                del self._homes[session]
                if self._used is not None:
                    self._used.pop(session, None)
                if session not in worker.sessions_reported_lost:
                    self._lost[session] = why
                lost.append(session)
        while len(self._lost) > LOST_SESSIONS_KEPT:
            del self._lost[next(iter(self._lost))]
        return lost

    def clear(self) -> None:
        self._homes.clear()
