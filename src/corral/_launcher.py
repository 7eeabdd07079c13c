"""How a worker process is started: the launcher seam and the local launcher.

Owns: building the worker's command line and environment, spawning it under a
shepherd (see ``_shepherd.py``) in a new session, the descriptors it gets (the
protocol pipes (calls, replies, control) and the lifeline, nothing else), and the signals that stop
it. With ``WorkerSpec.preload``, workers are forked from a preloaded template
instead (``_forkserver``), and spawned as here whenever no template can serve.
Must not touch: what travels on the protocol pipes (``_transport``) or what
the messages mean (``_handle``). A launcher that places workers elsewhere (a
cluster) offers the same ``Launcher``/``LaunchedWorker`` surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from . import _forkserver
from ._errors import ProtocolError, WorkerStartError
from ._framing import FrameDecoder, FrameEncoder
from ._messages import ParentBound
from ._shepherd_control import ShepherdControl
from ._shm import LargeBuffers
from ._transport import FrameConnection, open_pipe_connection

__all__ = [
    "LaunchedWorker",
    "Launcher",
    "LocalLauncher",
    "ProcessEvents",
    "WorkerEvents",
    "WorkerSpec",
]

SHEPHERD = str(Path(__file__).with_name("_shepherd.py"))
SYS_PATH_ENV = "CORRAL_SYS_PATH"
MATH_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
# Runs in the worker before anything else, so that corral itself (and the
# target) import the way they do in the parent, whatever sys.path that took.
_BOOTSTRAP = (
    "import json,os,sys\n"
    f"p=os.environ.get({SYS_PATH_ENV!r})\n"
    "if p: sys.path[:]=json.loads(p)\n"
    "from corral.worker.__main__ import main\n"
    "main()\n"
)
_TEMPLATE_BOOTSTRAP = _BOOTSTRAP.replace("corral.worker.__main__", "corral.worker._template")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start one worker."""

    worker_id: str
    target: str
    python: str | None = None  # None: the parent's interpreter, with its sys.path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    max_message_size: int = 0
    env_allowlist: tuple[str, ...] | None = None  # None: inherit the whole environment
    single_threaded_math: bool = True
    preload: tuple[str, ...] = ()  # modules a template imports once; workers fork from it
    startup_timeout: float = 60.0  # bounds the template's preload imports too
    # Large buffers out of band (``_shm``): buffers over the threshold go through
    # segments named ``shm_prefix...``; 0 keeps everything on the pipes.
    large_buffer_threshold: int = 0
    shm_prefix: str = ""

    def command(self, read_fd: int, write_fd: int, control_fd: int) -> list[str]:
        """The worker's argv (without the shepherd in front)."""
        args = ["--fds", f"{read_fd},{write_fd},{control_fd}", *self.worker_args()]
        if self.python is None:
            return [sys.executable, "-c", _BOOTSTRAP, *args]
        return [self.python, "-m", "corral.worker", *args]

    def template_command(self, socket_fd: int) -> list[str]:
        """The preload template's argv (without the shepherd in front)."""
        args = ["--socket", str(socket_fd), "--preload", ",".join(self.preload)]
        if self.python is None:
            return [sys.executable, "-c", _TEMPLATE_BOOTSTRAP, *args]
        return [self.python, "-m", "corral.worker._template", *args]

    def worker_args(self) -> list[str]:
        """The worker's options after ``--fds`` (a forked worker gets the same)."""
        large = (
            [
                "--large-buffer-threshold",
                str(self.large_buffer_threshold),
                "--shm-prefix",
                self.shm_prefix,
            ]
            if self.large_buffer_threshold
            else []
        )
        return [
            "--worker-id",
            self.worker_id,
            "--max-message-size",
            str(self.max_message_size),
            *large,
            self.target,
        ]

    def shepherd_options(self) -> list[str]:
        """The shepherd's options: which segments to unlink once the worker is gone."""
        return [f"--unlink-prefix={self.shm_prefix}"] if self.shm_prefix else []

    def large_buffers(self) -> LargeBuffers | None:
        """The pool's side of this worker's segments; None when the path is off."""
        if not self.large_buffer_threshold:
            return None
        return LargeBuffers(self.shm_prefix, self.large_buffer_threshold, "p")

    def environment(self) -> dict[str, str]:
        if self.env_allowlist is None:
            inherited = dict(os.environ)
        else:
            inherited = {k: os.environ[k] for k in self.env_allowlist if k in os.environ}
        env = {**inherited, **self.env}
        if self.single_threaded_math:
            for name in MATH_THREAD_VARIABLES:
                env.setdefault(name, "1")
        if self.python is None:
            env[SYS_PATH_ENV] = json.dumps([p or os.getcwd() for p in sys.path])
        return env


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

    @property
    def pid(self) -> int:
        """Pid of the process the pool controls (for the local launcher, the shepherd)."""

    def terminate(self) -> None:
        """Ask politely: SIGTERM to the worker's process group."""

    def kill(self) -> None:
        """SIGKILL the worker's whole process group."""

    def close(self) -> None:
        """Release every descriptor and transport; kills the group if still alive."""


class Launcher(Protocol):
    async def launch(self, spec: WorkerSpec, events: WorkerEvents) -> LaunchedWorker: ...


class _ShepherdProtocol(asyncio.SubprocessProtocol):
    def __init__(self, events: ProcessEvents) -> None:
        self.events = events
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Duck-typed: uvloop's process transport is not an asyncio subclass.
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd == 2:
            self.events.stderr_received(data if isinstance(data, bytes) else data.encode())

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 2:
            self.events.stderr_closed()

    def process_exited(self) -> None:
        assert self.transport is not None
        code = self.transport.get_returncode()
        self.events.process_exited(code if code is not None else -1)


class _LocalWorker(ShepherdControl):
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


def shepherd_command(
    lifeline_fd: int, command: Sequence[str], options: Sequence[str] = ()
) -> list[str]:
    """The argv that runs ``command`` under a shepherd (``python -I -S _shepherd.py``)."""
    return [sys.executable, "-I", "-S", SHEPHERD, str(lifeline_fd), *options, "--", *command]


async def spawn_under_shepherd(
    command: Sequence[str],
    child_fds: Sequence[int],
    events: ProcessEvents,
    env: Mapping[str, str],
    cwd: str | None,
    worker_id: str | None = None,
    shepherd_options: Sequence[str] = (),
) -> tuple[asyncio.SubprocessTransport, int]:
    """Start ``command`` under a shepherd in a new session; returns (transport, lifeline).

    The child gets ``child_fds`` (and the shepherd's lifeline), nothing else; the
    caller still owns ``child_fds`` and closes them. The lifeline's write end is
    the caller's: closing it kills the process's group.
    """
    loop = asyncio.get_running_loop()
    lifeline_r, lifeline_w = os.pipe()
    full = shepherd_command(lifeline_r, command, shepherd_options)
    try:
        try:
            transport, _ = await loop.subprocess_exec(  # uvloop's is duck-typed
                lambda: _ShepherdProtocol(events),
                *full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(*child_fds, lifeline_r),
                close_fds=True,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        except OSError as exc:
            raise WorkerStartError(
                f"cannot start worker process: {exc}", worker_id=worker_id
            ) from exc
    except BaseException:
        os.close(lifeline_w)
        raise
    finally:
        os.close(lifeline_r)
    return transport, lifeline_w


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
            transport.kill()
            transport.close()
            raise
        return _LocalWorker(
            transport,
            connection,
            lifeline_w,
            parent_fds=(to_parent_r, to_worker_w, control_w),
        )
