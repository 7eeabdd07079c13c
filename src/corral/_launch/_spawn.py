"""Starting a process under a shepherd, on the event loop.

Owns: the shepherd's command line (``shepherd_command``), spawning it in a new
session with only the descriptors it is given (``spawn_under_shepherd``), the
lifeline pipe, and turning its stderr and exit into ``ProcessEvents``
(``_ShepherdProtocol``). Used by the local launcher and the fork server alike.
Must not touch: the protocol pipes' contents, or what the process runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

from .._errors import WorkerStartError
from ._seam import ProcessEvents

__all__ = ["SHEPHERD", "kill_and_reap", "shepherd_command", "spawn_under_shepherd"]

SHEPHERD = str(Path(__file__).parent.parent / "_shepherd.py")


class _ShepherdProtocol(asyncio.SubprocessProtocol):
    def __init__(self, events: ProcessEvents) -> None:
        self.events = events
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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
        if not self.exited.done():
            self.exited.set_result(None)


async def kill_and_reap(transport: asyncio.SubprocessTransport, timeout: float = 5.0) -> None:
    """SIGKILL a shepherd started here and wait until it is reaped, then close it.

    For a launch cut off midway (cancelled, or failed after the spawn): the
    process is awaited to its end even if the waiting task is cancelled again,
    so nothing is left running when the event loop ends. Bounded by ``timeout``.
    """
    protocol = transport.get_protocol()
    with contextlib.suppress(ProcessLookupError):
        transport.kill()
    if isinstance(protocol, _ShepherdProtocol):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not protocol.exited.done() and loop.time() < deadline:
            try:
                await asyncio.wait_for(asyncio.shield(protocol.exited), deadline - loop.time())
            except asyncio.CancelledError:
                continue  # the launch is being cancelled already: finish reaping first
            except TimeoutError:
                break
    transport.close()


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
