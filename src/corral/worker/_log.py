"""The worker's logger, made on first use.

Owns: the one logger of a worker process, bound with its worker id and pid.
Must not touch: the wire or the handlers. structlog (and what it imports, rich
among them when it is installed) is imported only when a worker logs, which an
idle, healthy worker never does: its start stays light.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["worker_log"]


class _LazyLog:
    """Forwards to a structlog logger bound with ``worker_id`` and ``pid``, made
    the first time something is logged."""

    __slots__ = ("_bound", "_worker_id")

    def __init__(self, worker_id: str) -> None:
        self._worker_id = worker_id
        self._bound: Any = None

    def __getattr__(self, name: str) -> Any:
        bound = self._bound
        if bound is None:
            import structlog

            bound = self._bound = structlog.get_logger("corral.worker").bind(
                worker_id=self._worker_id, pid=os.getpid()
            )
        return getattr(bound, name)


def worker_log(worker_id: str) -> Any:
    """The worker's logger: ``.error(...)``, ``.exception(...)`` as structlog's."""
    return _LazyLog(worker_id)
