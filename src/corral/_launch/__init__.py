"""Launching workers: the seam the pool talks to, and the launchers behind it.

Owns: how a worker process comes to exist and how it is stopped, and nothing
about what it says. The modules, each with one job:

- ``_seam``: the ``Launcher`` and ``LaunchedWorker`` protocols, complete (the
  pool calls nothing a launcher does not declare), and the events a launched
  worker reports.
- ``_spec``: ``WorkerSpec``, one worker's argv, environment and options.
- ``_spawn``: a process under a shepherd, in a new session (``_shepherd.py``).
- ``_shepherd_control``: terminate / kill / force-kill through the shepherd.
- ``_local``: ``LocalLauncher``, spawned workers, or forked ones with preload.
- ``_forkserver``: preload templates and the workers forked from them.
- ``_handshake``, ``_shim``, ``_socket_launcher``: workers placed on other
  hosts over TCP (``ShimLauncher``; ``corral.ray`` builds on it).

Imports go one way: ``_seam``/``_spec`` <- ``_spawn`` <- ``_forkserver`` <-
``_local``; nothing here imports the pool. Must not touch: the protocol's
messages (``_transport`` carries them, ``_handle`` reads them).
"""

from ._local import FORK_AVAILABLE, LocalLauncher
from ._seam import LaunchedWorker, Launcher, NothingHeld, ProcessEvents, WorkerEvents
from ._spec import WorkerSpec

__all__ = [
    "FORK_AVAILABLE",
    "LaunchedWorker",
    "Launcher",
    "LocalLauncher",
    "NothingHeld",
    "ProcessEvents",
    "WorkerEvents",
    "WorkerSpec",
]
