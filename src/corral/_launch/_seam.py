"""The launcher seam: what the pool asks of a launcher and of a launched worker.

Owns: the complete protocols (``Launcher``, ``LaunchedWorker``) and the events a
launched process reports (``ProcessEvents``, ``WorkerEvents``). Every method the
pool calls is declared here, so the pool never probes a launcher for what it
offers; ``NothingHeld`` gives the no-op methods to a launcher that keeps
nothing between launches. Must not touch: processes, descriptors or messages.
"""

from __future__ import annotations

from typing import Any, Protocol

from .._errors import ProtocolError
from .._transport import FrameConnection
from ._spec import WorkerSpec

__all__ = ["LaunchedWorker", "Launcher", "NothingHeld", "ProcessEvents", "WorkerEvents"]


class ProcessEvents(Protocol):
    """What a process under a shepherd reports, all on the event loop."""

    def stderr_received(self, data: bytes) -> None: ...
    def stderr_closed(self) -> None: ...
    def process_exited(self, returncode: int) -> None: ...


class WorkerEvents(ProcessEvents, Protocol):
    """What a launched worker reports to its handle, all on the event loop."""

    def frame_received(self, message: Any) -> None: ...
    def connection_broken(self, error: ProtocolError | None) -> None: ...
    def frames_done(self) -> None: ...
    def process_lost(self, reason: str) -> None:
        """A worker on another host can no longer be reached; no exit status will come."""


class LaunchedWorker(Protocol):
    """The launcher's handle on one started worker."""

    connection: FrameConnection
    #: Where it runs when a launcher placed it on another node (its id and
    #: address, as the launcher reports them); None for a worker on this host.
    node_id: str | None
    node_address: str | None

    @property
    def pid(self) -> int:
        """Pid of the process the pool controls (for the local launcher, the shepherd)."""

    @property
    def same_host(self) -> bool:
        """Whether the worker runs on this host: its pid, /proc and rlimits mean something."""

    def terminate(self) -> None:
        """Ask politely: SIGTERM to the worker's process group."""

    def kill(self) -> None:
        """SIGKILL the worker's whole process group."""

    def force_kill(self) -> None:
        """Last resort when ``kill`` did not end it: stop whatever runs the worker."""

    def close(self) -> None:
        """Release every descriptor and transport; kills the group if still alive."""

    def forget_after_fork(self) -> None:
        """In a forked child of the pool's process: drop descriptors, touch nothing else."""


class Launcher(Protocol):
    """Starts workers for a pool; the pool calls every method here, and nothing else."""

    async def launch(self, spec: WorkerSpec, events: WorkerEvents) -> LaunchedWorker:
        """Start one worker; raises WorkerStartError if it cannot be started."""

    async def refresh(self) -> None:
        """Before ``Pool.reload()``: let later launches pick up new code."""

    async def aclose(self) -> None:
        """After the pool's workers are gone: release what the launcher holds."""

    def abandon(self) -> None:
        """Last resort when the pool is garbage: kill what it holds, await nothing."""

    def forget_after_fork(self) -> None:
        """In a forked child of the pool's process: drop its descriptors."""


class NothingHeld:
    """The ``Launcher`` methods of a launcher that holds nothing between launches."""

    async def refresh(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def abandon(self) -> None:
        return None

    def forget_after_fork(self) -> None:
        return None
