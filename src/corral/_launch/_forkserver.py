"""The pool's side of preloading: templates, and workers forked from them.

Owns: starting a template (``corral.worker._template``) under a shepherd, one
per preload list and environment; noticing its death and starting it again in
the background; sending it worker requests (the worker's descriptors by
SCM_RIGHTS); and the parent's handle on a forked worker (``ForkedWorker``), which
offers the same surface as a spawned one: pid, terminate, kill, close, and
``process_exited(returncode)`` with the worker's real exit status, read from a
status pipe its shepherd alone writes.

Whenever no template can serve (it is being started again, it died under a
request, the fork failed), ``Templates.launch`` returns None and the launcher
spawns the worker plainly: a caller never waits for, nor fails because of, a
template. Only the first start of a template is awaited, so a preload module
that does not import fails the pool's start with a WorkerStartError.

Must not touch: the protocol (``_transport`` carries it, ``_handle`` reads it)
or the pool's bookkeeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from .._errors import WorkerStartError, describe_exit
from .._framing import FrameDecoder, FrameEncoder
from .._log import get_logger
from .._messages import ParentBound
from .._transport import FrameConnection, open_pipe_connection
from ._seam import ProcessEvents, WorkerEvents
from ._shepherd_control import ShepherdControl
from ._spec import WorkerSpec

__all__ = ["ForkedWorker", "Template", "Templates"]

_REPLY_MAX = 65536
_FORK_TIMEOUT = 10.0  # from a request to the shepherd's "started": a healthy template takes ms
_STOP_TIMEOUT = 5.0
_RETRY_MAX = 60.0
_TAIL_LINES = 40

Spawner = Callable[
    [Sequence[str], Sequence[int], "ProcessEvents", Mapping[str, str], "str | None", "str | None"],
    Awaitable[tuple[asyncio.SubprocessTransport, int]],
]

_log = get_logger("corral")


class _Unavailable(Exception):
    """This template cannot serve this request: spawn the worker plainly instead."""


class Template:
    """The parent's handle on one template process (and the shepherd it runs under)."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        self.preload = preload
        self.pid: int | None = None  # the template's own pid, from its "ready"
        self.exit_code: int | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._lifeline = -1
        self._socket: socket.socket | None = None
        self._exited = asyncio.Event()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self._log = _log.bind(template_preload=",".join(preload))

    @property
    def shepherd_pid(self) -> int | None:
        """Pid of the shepherd the template runs under."""
        return None if self._transport is None else self._transport.get_pid()

    @property
    def alive(self) -> bool:
        """Started, not hung up on, and not exited."""
        return self._socket is not None and not self._exited.is_set()

    @property
    def stderr_tail(self) -> str:
        """The template's last stderr lines (its shepherd's and its own)."""
        return "\n".join(self._stderr)

    # --- ProcessEvents, from the shepherd's transport ---------------------------------

    def stderr_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for raw in lines:
            line = raw[:4096].decode(errors="replace")
            self._stderr.append(line)
            self._log.info("template.stderr", line=line, pid=self.pid)

    def stderr_closed(self) -> None:
        if self._partial:
            self.stderr_received(b"\n")

    def process_exited(self, returncode: int) -> None:
        self.exit_code = returncode
        self._exited.set()
        if self._socket is not None:
            self._log.warning("template.exited", pid=self.pid, exit=describe_exit(returncode))
            self._close_descriptors()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, spec: WorkerSpec, spawn: Spawner) -> None:
        """Start the template and wait for its preload imports; raises WorkerStartError."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._transport, self._lifeline = await spawn(
                spec.template_command(theirs.fileno()),
                (theirs.fileno(),),
                self,
                spec.environment(),
                spec.cwd,
                spec.worker_id,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._socket = ours
        self._log.info("template.starting", shepherd_pid=self.shepherd_pid)
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(loop.sock_recv(ours, _REPLY_MAX), spec.startup_timeout)
        except TimeoutError:
            await self.stop()
            raise WorkerStartError(
                f"preload of {', '.join(self.preload)} did not finish within "
                f"startup_timeout={spec.startup_timeout}s",
                worker_id=spec.worker_id,
                stderr_tail=self.stderr_tail,
            ) from None
        except BaseException:
            self.abandon()  # cancelled: hang up now; whoever holds us stop()s us
            raise
        message = _parse(reply)
        if "ready" not in message:
            await self.stop()
            what = message.get("error") or (
                f"the preload template exited during start-up ({describe_exit(self.exit_code)})"
            )
            raise WorkerStartError(
                str(what),
                worker_id=spec.worker_id,
                exit_code=self.exit_code,
                stderr_tail=str(message.get("traceback") or self.stderr_tail),
            )
        self.pid = int(message["ready"])
        self._log = self._log.bind(pid=self.pid)
        self._log.info("template.ready", seconds=round(time.monotonic() - started, 3))

    async def fork(self, spec: WorkerSpec, events: WorkerEvents) -> ForkedWorker:
        """Ask the template for one worker; raises _Unavailable if it cannot give one."""
        sock = self._socket
        if sock is None or self._exited.is_set():
            raise _Unavailable("the template is not running")
        to_worker_r, to_worker_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        control_r, control_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        status_r, status_w = os.pipe()
        child_ends = [to_worker_r, to_parent_w, control_r, lifeline_r, stderr_w, status_w]
        parent_ends = [to_parent_r, to_worker_w, control_w, lifeline_w, stderr_r, status_r]
        request = {
            "worker_id": spec.worker_id,
            "target": spec.target,
            "args": spec.worker_args(),
            "unlink_prefix": spec.shm_prefix,
        }
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], child_ends)
        except OSError as exc:
            for fd in parent_ends:
                os.close(fd)
            self.abandon()  # a template that cannot take a request is of no use
            raise _Unavailable(f"cannot send the request: {exc}") from exc
        finally:
            for fd in child_ends:
                os.close(fd)
        worker = ForkedWorker(
            lifeline_w, parent_fds=(to_parent_r, to_worker_w, control_w, stderr_r, status_r)
        )
        wire = [to_parent_r, to_worker_w, control_w]  # ours until the connection owns them
        try:
            await worker.attach_pipes(status_r, stderr_r)
            await asyncio.wait_for(asyncio.shield(worker.started), _FORK_TIMEOUT)
            wire = []
            large = spec.large_buffers()
            worker.connection = await open_pipe_connection(
                to_parent_r,
                to_worker_w,
                events,
                FrameDecoder(ParentBound, spec.max_message_size, large),  # type: ignore[arg-type]
                FrameEncoder(spec.max_message_size, large),
                control_fd=control_w,
            )
        except BaseException as exc:
            worker.discard()
            for fd in wire:
                os.close(fd)
            if isinstance(exc, _Unavailable | TimeoutError):
                if self._exited.is_set():
                    self.abandon()
                said = worker.early_stderr()
                raise _Unavailable(
                    (str(exc) or "no answer from the template") + (f": {said}" if said else "")
                ) from exc
            raise
        worker.attach(events)
        return worker

    def _close_descriptors(self) -> None:
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def abandon(self) -> None:
        """Hang up now: the template exits, and its shepherd kills its group."""
        self._close_descriptors()

    def discard(self) -> None:
        """Hang up and release the shepherd's transport (SIGKILL to it if it still runs)."""
        self.abandon()
        if self._transport is not None:
            self._transport.close()

    async def stop(self) -> None:
        """Hang up and wait (bounded) for the template and its shepherd to end."""
        self._close_descriptors()
        transport = self._transport
        if transport is None:
            return
        try:
            await asyncio.wait_for(self._exited.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            self._log.error("template.shepherd_unresponsive")
            with contextlib.suppress(ProcessLookupError):
                if transport.get_returncode() is None:
                    os.kill(transport.get_pid(), signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), _STOP_TIMEOUT)
        transport.close()

    def forget_after_fork(self) -> None:
        """In a forked child of the pool's process: drop our copies, touch nothing else."""
        if self._lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = -1
        if self._socket is not None:
            devnull = os.open(os.devnull, os.O_RDWR)
            with contextlib.suppress(OSError):
                os.dup2(devnull, self._socket.fileno())
            os.close(devnull)

    def __del__(self) -> None:
        # Forgotten without stop(): closing the lifeline still ends the template.
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1


def _parse(reply: bytes) -> dict[str, Any]:
    if not reply:
        return {}
    try:
        message = json.loads(reply)
    except ValueError:
        return {"error": f"the preload template answered {reply[:200]!r}"}
    return message if isinstance(message, dict) else {}


class _StatusReader(asyncio.Protocol):
    """Reads the forked shepherd's status lines: ``started C W``, then ``exit CODE``."""

    def __init__(self, worker: ForkedWorker) -> None:
        self._worker = worker
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._worker.status_line(line.decode(errors="replace").split())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker.status_closed()


class _StderrReader(asyncio.Protocol):
    def __init__(self, worker: ForkedWorker) -> None:
        self._worker = worker

    def data_received(self, data: bytes) -> None:
        self._worker.stderr_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker.stderr_data(None)


class ForkedWorker(ShepherdControl):
    """A worker forked from a template, seen from the pool: a ``LaunchedWorker``.

    ``pid`` is its shepherd's (forked from the template, like the one a spawned
    worker runs under). Its exit status comes from the status pipe, which only
    that shepherd holds: the line ``exit CODE`` it writes after reaping the
    worker. If the pipe ends without it, the shepherd itself was killed (the
    worker dies with it, by PR_SET_PDEATHSIG): that is reported as SIGKILL.
    """

    same_host = True  # its pid and /proc are this host's
    node_id: str | None = None
    node_address: str | None = None

    connection: FrameConnection

    def __init__(self, lifeline: int, parent_fds: tuple[int, ...]) -> None:
        self._lifeline = lifeline
        self._parent_fds = parent_fds
        self._pid = 0
        self.worker_pid = 0
        self._pidfd = -1
        self.returncode: int | None = None
        self._reported = False
        self._events: WorkerEvents | None = None
        self._early_stderr: list[bytes | None] = []
        self._status_transport: asyncio.BaseTransport | None = None
        self._stderr_transport: asyncio.BaseTransport | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        """Pid of the worker's shepherd."""
        return self._pid

    async def attach_pipes(self, status_fd: int, stderr_fd: int) -> None:
        """Read the status and stderr pipes on the loop; each transport owns its fd."""
        loop = asyncio.get_running_loop()
        status_file = os.fdopen(status_fd, "rb", buffering=0)
        stderr_file = os.fdopen(stderr_fd, "rb", buffering=0)
        try:
            self._status_transport, _ = await loop.connect_read_pipe(
                lambda: _StatusReader(self), status_file
            )
            self._stderr_transport, _ = await loop.connect_read_pipe(
                lambda: _StderrReader(self), stderr_file
            )
        except BaseException:
            if self._status_transport is None:
                status_file.close()
            stderr_file.close()
            raise

    def attach(self, events: WorkerEvents) -> None:
        """From now on, report to ``events`` (what came before is delivered first)."""
        self._events = events
        for data in self._early_stderr:
            if data is None:
                events.stderr_closed()
            else:
                events.stderr_received(data)
        self._early_stderr.clear()
        if self.returncode is not None:
            asyncio.get_running_loop().call_soon(self._report)

    # --- from the pipes -------------------------------------------------------------

    def status_line(self, words: list[str]) -> None:
        """One line from the shepherd: ``started C W``, ``exit CODE`` or ``error ...``."""
        if len(words) == 3 and words[0] == "started" and not self.started.done():
            self._pid, self.worker_pid = int(words[1]), int(words[2])
            with contextlib.suppress(AttributeError, OSError):
                self._pidfd = os.pidfd_open(self._pid)
            self.started.set_result(None)
        elif len(words) == 2 and words[0] == "exit" and self.returncode is None:
            self.returncode = int(words[1])
            self._report()
        elif words and words[0] == "error" and not self.started.done():
            self.started.set_exception(_Unavailable(" ".join(words[1:])))
            self.started.exception()  # retrieved: the launcher may have stopped waiting

    def status_closed(self) -> None:
        """The shepherd's end of the status pipe closed: it has ended."""
        if not self.started.done():
            self.started.set_exception(_Unavailable("the template ended the request unanswered"))
            self.started.exception()
            return
        if self.returncode is None:
            # The shepherd was killed: the worker got SIGKILL from PR_SET_PDEATHSIG;
            # clear its group (the worker's pid still names it while any member lives).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.worker_pid, signal.SIGKILL)
            self.returncode = -signal.SIGKILL
            self._report()

    def early_stderr(self) -> str:
        """What the worker wrote to stderr before it was attached (for failure messages)."""
        data = b"".join(d for d in self._early_stderr if d is not None)
        return data[-2000:].decode(errors="replace").strip()

    def stderr_data(self, data: bytes | None) -> None:
        """Worker output (None: the pipe closed), held until ``attach``."""
        if self._events is None:
            self._early_stderr.append(data)
        elif data is None:
            self._events.stderr_closed()
        else:
            self._events.stderr_received(data)

    def _report(self) -> None:
        if self._events is not None and not self._reported and self.returncode is not None:
            self._reported = True
            self._events.process_exited(self.returncode)

    # --- LaunchedWorker --------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        # Only until the shepherd reported its end: after that its pid is not ours.
        if self.returncode is not None or not self._pid:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self._pid, sig)

    def discard(self) -> None:
        """Release the lifeline and the status and stderr pipes (the shepherd kills its worker)."""
        self._close_lifeline()
        for transport in (self._status_transport, self._stderr_transport):
            if transport is not None:
                transport.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def close(self) -> None:
        """Release every descriptor and transport; the shepherd then kills the group."""
        self.discard()
        self.connection.close()

    def forget_after_fork(self) -> None:
        """In a forked child of the pool's process: drop our copies, touch nothing else."""
        if self._lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = -1
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in (*self._parent_fds, self._pidfd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def __del__(self) -> None:
        if self._lifeline >= 0:
            self._close_lifeline()


class _Slot:
    """One template key: the template serving it, and its restarts."""

    def __init__(self) -> None:
        self.template: Template | None = None
        self.lock = asyncio.Lock()
        self.started_once = False
        self.restarting: asyncio.Task[None] | None = None
        self.starting: Template | None = None  # being started, by launch() or a restart
        self.last_spec: WorkerSpec | None = None  # the spec a template is started for
        self.failures = 0
        self.retry_at = 0.0


class Templates:
    """The launcher's templates, one per preload list and worker environment."""

    def __init__(self, spawn: Spawner) -> None:
        self._spawn = spawn
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._closed = False

    @staticmethod
    def _key(spec: WorkerSpec) -> tuple[Any, ...]:
        return (spec.preload, spec.python, spec.cwd, tuple(sorted(spec.environment().items())))

    async def launch(self, spec: WorkerSpec, events: WorkerEvents) -> ForkedWorker | None:
        """A worker forked from this spec's template, or None: spawn it plainly."""
        if self._closed:
            return None
        slot = self._slots.setdefault(self._key(spec), _Slot())
        slot.last_spec = spec
        if not slot.started_once:
            async with slot.lock:
                if not slot.started_once:
                    # The first start is awaited: a preload that fails fails the pool.
                    first = slot.starting = Template(spec.preload)
                    try:
                        await first.start(spec, self._spawn)
                    finally:
                        slot.starting = None
                    slot.template, slot.started_once = first, True
        template = slot.template
        if template is None or not template.alive:
            self._restart_later(slot, spec)
            return None
        try:
            return await template.fork(spec, events)
        except _Unavailable as exc:
            _log.warning(
                "template.fork_failed", worker_id=spec.worker_id, error=str(exc), fallback="spawn"
            )
            if not template.alive:
                self._restart_later(slot, spec)
            return None

    def _restart_later(self, slot: _Slot, spec: WorkerSpec) -> None:
        if slot.restarting is not None or time.monotonic() < slot.retry_at or self._closed:
            return
        old, slot.template = slot.template, None
        if old is not None:
            old.discard()
        slot.restarting = asyncio.get_running_loop().create_task(self._restart(slot, spec))

    async def _restart(self, slot: _Slot, spec: WorkerSpec) -> None:
        template = slot.starting = Template(spec.preload)
        try:
            await template.start(spec, self._spawn)
        except (WorkerStartError, OSError) as exc:
            slot.failures += 1
            delay = min(_RETRY_MAX, 2.0**slot.failures)
            slot.retry_at = time.monotonic() + delay
            _log.error(
                "template.restart_failed",
                error=str(exc),
                retry_in=delay,
                stderr_tail=getattr(exc, "stderr_tail", None),
            )
            return
        finally:
            slot.restarting = slot.starting = None
        if self._closed:
            await template.stop()
            return
        slot.failures = 0
        slot.template = template
        _log.info("template.restarted", pid=template.pid)

    async def refresh(self) -> None:
        """Start every template afresh (new code in preloaded modules) and wait for it.

        Until a new template is ready, workers are spawned plainly; if one fails
        to start, the failure is logged and workers keep being spawned plainly.
        """
        for slot in self._slots.values():
            if slot.started_once and slot.restarting is None and slot.last_spec is not None:
                slot.retry_at = 0.0
                self._restart_later(slot, slot.last_spec)
        restarting = [s.restarting for s in self._slots.values() if s.restarting is not None]
        if restarting:
            await asyncio.wait(restarting)

    def alive(self) -> list[Template]:
        """The templates alive now."""
        return [s.template for s in self._slots.values() if s.template and s.template.alive]

    async def wait_ready(self, timeout: float) -> None:
        """Wait until a template is alive; TimeoutError past ``timeout`` or if none is coming."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.alive():
            pending = [s.restarting for s in self._slots.values() if s.restarting is not None]
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                raise TimeoutError(f"no template ready after {timeout}s")
            await asyncio.wait(pending, timeout=remaining)

    async def aclose(self) -> None:
        """Stop every template and every restart in progress. Idempotent."""
        self._closed = True
        restarting = [s.restarting for s in self._slots.values() if s.restarting is not None]
        for task in restarting:
            task.cancel()
        templates = [t for s in self._slots.values() for t in (s.template, s.starting) if t]
        if restarting:
            await asyncio.wait(restarting)
        self._slots.clear()
        await asyncio.gather(*(t.stop() for t in templates))

    def abandon(self) -> None:
        """Hang up on every template now, awaiting nothing."""
        self._closed = True
        for slot in self._slots.values():
            if slot.restarting is not None:
                slot.restarting.cancel()
            for template in (slot.template, slot.starting):
                if template is not None:
                    template.abandon()

    def forget_after_fork(self) -> None:
        """In a forked child of the pool's process: drop the templates' descriptors."""
        for slot in self._slots.values():
            if slot.template is not None:
                slot.template.forget_after_fork()
