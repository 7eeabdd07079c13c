"""The local launcher: each worker a subprocess of this host, under its own shepherd.

Owns: spawning a worker under a shepherd (``_spawn``) with the three protocol
pipes (calls, replies, control) and the lifeline as its only descriptors, the
parent's handle on it (``_LocalWorker``: signals through the shepherd, fork
safety), and, with ``WorkerSpec.preload``, forking workers from a preloaded
template instead (``_forkserver``), spawning whenever no template can serve.
Must not touch: what travels on the protocol pipes (``_transport``) or what the
messages mean (``_handle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from .._framing import FrameDecoder, FrameEncoder
from .._messages import ParentBound
from .._transport import FrameConnection, open_pipe_connection
from . import _forkserver
from ._seam import LaunchedWorker, WorkerEvents
from ._shepherd_control import ShepherdControl
from ._spawn import kill_and_reap, spawn_under_shepherd
from ._spec import WorkerSpec

__all__ = ["FORK_AVAILABLE", "LocalLauncher"]


class _LocalWorker(ShepherdControl):
    """A worker spawned on this host; the pool signals it through its shepherd."""

    same_host = True  # its pid and /proc are this host's
    node_id: str | None = None
    node_address: str | None = None

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        connection: FrameConnection,
        lifeline: int,
        parent_fds: tuple[int, ...] = (),
    ) -> None:
        self._transport = transport
        self.connection = connection
        self._lifeline = lifeline
        self._pid = transport.get_pid()
        self._parent_fds = parent_fds

    @property
    def pid(self) -> int:
        return self._pid

    def _signal(self, sig: int) -> None:
        # Only while the shepherd has not been reaped: its pid is still ours.
        if self._transport.get_returncode() is None and not self._transport.is_closing():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

    def forget_after_fork(self) -> None:
        """In a forked child: drop our copies of the pool's descriptors, touch nothing else.

        The child must not keep the lifeline open (the workers would outlive the
        parent) nor the protocol pipes (they belong to the parent).
        """
        # The lifeline is ours alone: close it. The pipe descriptors belong to
        # file objects that may close them later; point them at /dev/null instead,
        # so such a late close can never hit a descriptor the child reused.
        if self._lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = -1
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in self._parent_fds:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def close(self) -> None:
        self._close_lifeline()
        self.connection.close()
        self._transport.close()

    def __del__(self) -> None:
        # Forgotten without close(): closing the lifeline makes the shepherd kill
        # the worker's group, so even a leaked pool leaves no process running.
        if self._lifeline >= 0:
            self._close_lifeline()


#: Whether workers can be forked from a template here (a platform without fork()
#: or SCM_RIGHTS spawns every worker plainly).
FORK_AVAILABLE = hasattr(os, "fork") and hasattr(socket, "send_fds")


class LocalLauncher:
    """Starts each worker as a local subprocess under its own shepherd.

    With ``WorkerSpec.preload``, it keeps one template per preload list and
    environment and forks workers from it (see ``_forkserver``); it falls back
    to spawning while no template can serve. ``aclose()`` stops the templates:
    the pool calls it once its workers are gone.
    """

    def __init__(self) -> None:
        self._templates = _forkserver.Templates(spawn_under_shepherd)

    async def launch(self, spec: WorkerSpec, events: WorkerEvents) -> LaunchedWorker:
        """Start one worker: forked from a template if preloading, else spawned."""
        if spec.preload and FORK_AVAILABLE:
            forked = await self._templates.launch(spec, events)
            if forked is not None:
                return forked
        return await self._spawn(spec, events)

    def templates(self) -> list[_forkserver.Template]:
        """The templates alive now (for inspection and tests)."""
        return self._templates.alive()

    async def wait_templates_ready(self, timeout: float) -> None:
        """Wait until a template is alive; raises TimeoutError past ``timeout``."""
        await self._templates.wait_ready(timeout)

    async def refresh(self) -> None:
        """Start the templates afresh, so forked workers get new code; waits for them."""
        await self._templates.refresh()

    async def aclose(self) -> None:
        """Stop every template (forked workers keep running until their pool stops them)."""
        await self._templates.aclose()

    def abandon(self) -> None:
        """Last resort when the pool is garbage: kill the templates, await nothing."""
        self._templates.abandon()

    def forget_after_fork(self) -> None:
        """In a forked child of the pool's process: drop the templates' descriptors."""
        self._templates.forget_after_fork()

    async def _spawn(self, spec: WorkerSpec, events: WorkerEvents) -> _LocalWorker:
        to_worker_r, to_worker_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        control_r, control_w = os.pipe()
        child_ends = (to_worker_r, to_parent_w, control_r)
        parent_ends = [to_parent_r, to_worker_w, control_w]
        try:
            transport, lifeline_w = await spawn_under_shepherd(
                spec.command(to_worker_r, to_parent_w, control_r),
                child_ends,
                events,
                spec.environment(),
                spec.cwd,
                spec.worker_id,
                spec.shepherd_options(),
            )
        except BaseException:
            for fd in parent_ends:
                os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        large = spec.large_buffers()
        try:
            connection = await open_pipe_connection(
                to_parent_r,
                to_worker_w,
                events,
                FrameDecoder(ParentBound, spec.max_message_size, large),  # type: ignore[arg-type]
                FrameEncoder(spec.max_message_size, large),
                control_fd=control_w,
            )
        except BaseException:
            os.close(lifeline_w)
            await kill_and_reap(transport)  # even when cancelled: nothing left running
            raise
        return _LocalWorker(
            transport,
            connection,
            lifeline_w,
            parent_fds=(to_parent_r, to_worker_w, control_w),
        )
