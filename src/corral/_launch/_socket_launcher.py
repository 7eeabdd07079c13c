"""Workers that connect back over TCP: the listener, the socket transport, the shim launcher.

Owns: the pool's listening socket (only peers that pass the ``_handshake`` get
past it), the three authenticated connections of each placed worker (data,
control, supervision) turned into the usual ``FrameConnection`` and
``WorkerEvents``, and ``ShimLauncher``: the generic "place a shim somewhere,
let it connect back" launcher. A subclass says only how to place the shim
(``SubprocessShimLauncher`` runs it as a local process; ``corral.ray`` as a
Ray actor). Must not touch: what the frames mean (``_handle``), or the remote
side (``_shim``).

Death, as the handle sees it:
- the shim reports the worker's exit status (``ShimExited``): that is
  ``process_exited``, exactly as with a local worker;
- the supervision connection ends without a status, or the placement ends (the
  Ray actor died) and no status follows within a grace: the worker is *lost*
  (``process_lost``): its calls fail with ``WorkerCrashed``/``SessionLost``;
- a worker that was told to die and whose status does not come within
  ``kill_timeout`` is stopped through the placement (``ray.kill``) and lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from .._door import check_seconds
from .._errors import PlacementError, ProtocolError, WorkerStartError
from .._framing import FrameDecoder, FrameEncoder
from .._log import get_logger
from .._messages import ParentBound
from .._stream_transport import StreamingTransport, StreamReadProtocol
from .._streamed import WIRE_STREAMED, StreamFrameDecoder, StreamFrameEncoder
from .._transport import FrameWriter, _ReadProtocol, tick_batch
from ._handshake import (
    KNOCK_SIZE,
    HandshakeError,
    Role,
    Ticket,
    TicketBook,
    read_knock,
    server_handshake,
)
from ._seam import NothingHeld, WorkerEvents
from ._shim import (
    ShimExited,
    ShimFailed,
    ShimMessage,
    ShimOrder,
    ShimSignal,
    ShimStarted,
    ShimStderr,
    shim_input,
)
from ._spec import WorkerSpec

__all__ = [
    "Listener",
    "Placement",
    "RemoteWorker",
    "ShimLauncher",
    "SocketConnection",
    "SubprocessShimLauncher",
]

_SUPERVISION_LIMIT = 1024 * 1024
_MAX_PENDING_HANDSHAKES = 64
_ACCEPT_BURST = 32
_PLACEMENT_END_GRACE = 1.0  # after the placement ends, how long the exit status may take
_BUSY_LOG_INTERVAL = 1.0  # refusals for load: at most one warning (with a count) this often

_log = get_logger("corral")


class Listener:
    """A TCP listening socket that admits only peers presenting a live ticket.

    Every accepted connection goes through ``server_handshake`` within
    ``handshake_timeout``. A connection whose knock (already there when it is
    accepted) names a launch in progress takes a slot reserved for that launch;
    any other takes one of ``max_pending`` shared slots, and is closed at once
    when none is free (counted in ``busy``: its shim connects again). So
    strangers can fill the shared slots, never a launch's. An authenticated
    socket is handed to the launch that issued its ticket; anything else is
    closed, and counted in ``rejected``.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        advertise_host: str | None = None,
        handshake_timeout: float = 10.0,
        max_pending: int = _MAX_PENDING_HANDSHAKES,
    ) -> None:
        self.host = host
        self.advertise_host = advertise_host or host
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.tickets = TicketBook()
        self.rejected = 0
        self.busy = 0  # connections closed at once: every shared slot was taken
        self._busy_logged = 0  # ``busy`` when the last warning about it was logged
        self._busy_logged_at = -_BUSY_LOG_INTERVAL
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._reserved: set[asyncio.Task[None]] = set()  # knocked for a live ticket
        self._rejection: asyncio.Event | None = None

    @property
    def port(self) -> int:
        """The port it listens on (once open)."""
        if self._sock is None:
            raise RuntimeError("the listener is not open")
        return int(self._sock.getsockname()[1])

    def open(self) -> None:
        """Bind and listen, on the running loop."""
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._on_acceptable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        _log.debug("listener.open", host=self.host, port=self.port)

    def _rejected(self) -> None:
        self.rejected += 1
        if self._rejection is not None:
            self._rejection.set()

    async def wait_rejected(self, count: int) -> None:
        """Wait until ``count`` peers in all have been turned away."""
        while self.rejected < count:
            self._rejection = event = asyncio.Event()
            await event.wait()

    def _on_acceptable(self) -> None:
        assert self._sock is not None
        assert self._loop is not None
        for _ in range(_ACCEPT_BURST):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again on the next wakeup
                _log.warning("listener.accept_failed", error=str(exc))
                return
            conn.setblocking(False)
            if self._knocks_for_a_launch(conn):
                slots = self._reserved
            elif len(self._handshakes) < self.max_pending:
                slots = self._handshakes
            else:
                self.busy += 1
                self._rejected()
                self._log_refusal(peer)
                conn.close()
                continue
            task = self._loop.create_task(self._admit(conn, peer))
            slots.add(task)
            task.add_done_callback(slots.discard)

    def _log_refusal(self, peer: Any) -> None:
        """One warning per second at most, with the count: a flood must not flood the log."""
        now = time.monotonic()
        if now - self._busy_logged_at >= _BUSY_LOG_INTERVAL:
            _log.warning(
                "listener.too_many_handshakes",
                peer=str(peer),
                refused=self.busy - self._busy_logged,
                max_pending=self.max_pending,
            )
            self._busy_logged_at = now
            self._busy_logged = self.busy

    def _knocks_for_a_launch(self, conn: socket.socket) -> bool:
        """Whether the peer's knock, already received, names a launch still waiting for it.

        Reserved slots are bounded by what the live tickets wait for, so even a
        peer that learnt a ticket id cannot take more than that.
        """
        try:
            first = conn.recv(KNOCK_SIZE, socket.MSG_PEEK)
        except OSError:  # nothing yet (BlockingIOError), or already reset
            return False
        knocked = read_knock(first)
        if knocked is None or self.tickets.lookup(*knocked) is None:
            return False
        return len(self._reserved) < self.tickets.expecting()

    async def _admit(self, conn: socket.socket, peer: Any) -> None:
        handed_over = False
        try:
            ticket, role = await server_handshake(conn, self.tickets, self.handshake_timeout)
            waiting = ticket.accepted[role]
            if not waiting.done():  # lost a race with another peer for this role, else
                waiting.set_result(conn)
                handed_over = True
            else:
                self._rejected()
        except (HandshakeError, TimeoutError, OSError) as exc:
            self._rejected()
            _log.warning("listener.rejected", peer=str(peer), reason=str(exc) or type(exc).__name__)
        finally:
            if not handed_over:
                conn.close()

    def close(self) -> None:
        """Stop listening; handshakes under way are abandoned (their sockets closed)."""
        if self._sock is None:
            return
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        for task in [*self._handshakes, *self._reserved]:
            task.cancel()

    @property
    def is_open(self) -> bool:
        return self._sock is not None


class _SinkProtocol(asyncio.Protocol):
    """The pool's side of the control connection: it writes, and expects nothing back.

    Its end tells nothing the data connection and the exit status do not.
    """

    def data_received(self, data: bytes) -> None:
        return None  # the worker never writes here


class SocketConnection:
    """Frames to a remote worker: calls and replies on the data socket, Ping/Cancel on control."""

    def __init__(self, writer: FrameWriter, control: FrameWriter) -> None:
        self._writer = writer
        self._control = control
        self.send = writer.send
        self.send_control = control.send

    def close(self) -> None:
        """Write what is queued (best effort) and close both sockets."""
        self._writer.close()
        self._control.close()


class _SupervisionProtocol(asyncio.Protocol):
    def __init__(self, worker: RemoteWorker) -> None:
        self._worker = worker
        self._decoder: FrameDecoder[Any] = FrameDecoder(ShimMessage, _SUPERVISION_LIMIT)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            self._worker.lost(f"the worker's shim broke the protocol: {exc}")
            return
        for message in messages:
            self._worker.shim_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker.lost(
            "lost contact with the worker's shim: its connection closed without an exit status"
            + (f" ({exc})" if exc else "")
        )


class Placement(Protocol):
    """Where a shim was placed, as the launcher that placed it can act on it."""

    @property
    def finished(self) -> asyncio.Future[str]:
        """Resolves, with a description, when the shim is known to have ended."""

    def stop(self) -> None:
        """Stop the shim where it runs (kills the worker with it); idempotent."""

    def describe(self) -> str:
        """What was asked for, for error messages (``"num_gpus=1"``...)."""


class RemoteWorker:
    """A worker started by a shim, seen through its three connections."""

    def __init__(
        self,
        spec: WorkerSpec,
        events: WorkerEvents,
        placement: Placement,
        *,
        kill_timeout: float,
        same_host: bool,
        on_close: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.placement = placement
        self.same_host = same_host
        self.host: str | None = None
        self.node_id: str | None = None  # where it runs, once the shim said
        self.node_address: str | None = None
        self.connection: SocketConnection
        self._encoder: StreamFrameEncoder | None = None  # streams once the shim says it can
        self._events = events
        self._kill_timeout = kill_timeout
        self._on_close = on_close
        self._pid = 0
        self._loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = self._loop.create_future()
        self._outcome: tuple[str, Any] | None = None  # ("exit", code) or ("lost", reason)
        self._reported = False  # the outcome was told to the pool
        self._closed = False
        self._supervision: asyncio.Transport | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._fds: tuple[int, ...] = ()
        self._end_timer: asyncio.TimerHandle | None = None
        self._log = _log.bind(worker_id=spec.worker_id)
        placement.finished.add_done_callback(self._placement_finished)

    @property
    def pid(self) -> int:
        """Pid of the worker's shepherd on its host (0 until the shim said)."""
        return self._pid

    async def attach(self, sockets: dict[Role, socket.socket]) -> None:
        """Take over the authenticated sockets; the worker owns them from here."""
        loop = self._loop
        size = self.spec.max_message_size
        # Large buffers follow their frames (``_streamed``) when the pool's
        # threshold asks for it; the encoder streams only once the shim says
        # the worker reads them (``ShimStarted.wire``), the decoder reads both.
        streamed = bool(self.spec.large_buffer_threshold)
        encoder = StreamFrameEncoder(size) if streamed else FrameEncoder(size)
        read: Callable[[], asyncio.BaseProtocol]
        if streamed:
            self._encoder = encoder  # type: ignore[assignment]
            stream_decoder: StreamFrameDecoder[Any] = StreamFrameDecoder(ParentBound, size)  # type: ignore[arg-type]
            read = lambda: StreamReadProtocol(stream_decoder, self._events, tick_batch(loop))  # noqa: E731
        else:
            decoder: FrameDecoder[Any] = FrameDecoder(ParentBound, size)  # type: ignore[arg-type]
            read = lambda: _ReadProtocol(decoder, self._events, tick_batch(loop))  # noqa: E731
        owned = dict(sockets)
        opened: list[asyncio.BaseTransport] = []
        try:
            supervision, _ = await loop.connect_accepted_socket(
                lambda: _SupervisionProtocol(self), owned[Role.SUPERVISION]
            )
            del owned[Role.SUPERVISION]  # the transport owns it from here
            self._supervision = supervision
            opened.append(supervision)
            data, _ = await loop.connect_accepted_socket(read, owned[Role.DATA])
            del owned[Role.DATA]
            opened.append(data)
            control, _ = await loop.connect_accepted_socket(_SinkProtocol, owned[Role.CONTROL])
            del owned[Role.CONTROL]
            opened.append(control)
        except BaseException:
            for transport in opened:
                transport.close()
            for sock in owned.values():
                sock.close()
            raise
        data_out: Any = data
        extra: tuple[int, ...] = ()
        if self._encoder is not None:
            data_out = StreamingTransport(loop, data, self._encoder)
            extra = (data_out.fileno,)
        self.connection = SocketConnection(
            FrameWriter(loop, data_out, encoder),
            FrameWriter(loop, control, FrameEncoder(size)),  # Ping and Cancel: always plain
        )
        self._fds = (
            *(t.get_extra_info("socket").fileno() for t in (supervision, data, control)),
            *extra,
        )

    # --- what the shim says ---------------------------------------------------

    def shim_message(self, message: Any) -> None:
        if isinstance(message, ShimStderr):
            self._events.stderr_received(message.data)
        elif isinstance(message, ShimStarted):
            self._pid = message.pid
            self.host = message.host
            self.node_id = message.node_id or message.host
            self.node_address = message.node_address or None
            self._log = self._log.bind(node_id=self.node_id, node_address=self.node_address)
            self._negotiate(message.wire)
            if not self.started.done():
                self.started.set_result(None)
        elif isinstance(message, ShimExited):
            self._exited_with(message.returncode)
        elif isinstance(message, ShimFailed):
            if not self.started.done():
                self.started.set_exception(
                    WorkerStartError(message.message, worker_id=self.spec.worker_id)
                )
            self._events.stderr_received(f"corral shim: {message.message}\n".encode())
            self._exited_with(127)
        elif isinstance(message, ShimSignal):
            self.lost("the worker's shim sent a message only the pool may send")

    def _exited_with(self, returncode: int) -> None:
        self._conclude(("exit", returncode))

    def lost(self, reason: str) -> None:
        """No exit status will come: the worker is lost, and stopped where it runs."""
        if self._outcome is None:
            self._conclude(("lost", reason))

    def _conclude(self, outcome: tuple[str, Any]) -> None:
        """The worker is over; tell the pool once its shim has ended too (or after a grace).

        So that when the pool hears of it, nothing of this worker is left
        running where it was placed. An exit status beats a loss decided first.
        """
        if self._reported or self._closed:
            return  # told already, or let go of (a launch that failed)
        if self._outcome is None or (outcome[0] == "exit" and self._outcome[0] == "lost"):
            self._outcome = outcome
        if outcome[0] == "lost":
            reason = outcome[1]
            if not self.started.done():
                self.started.set_exception(WorkerStartError(reason, worker_id=self.spec.worker_id))
            self.placement.stop()
        if self.placement.finished.done():
            self._report()
        elif self._end_timer is None:
            self._end_timer = self._loop.call_later(_PLACEMENT_END_GRACE, self._report)

    def _report(self) -> None:
        if self._reported or self._outcome is None:
            return
        self._reported = True
        self._cancel_timers()
        kind, value = self._outcome
        self._events.stderr_closed()
        if kind == "exit":
            self._events.process_exited(value)
        else:
            self._log.warning("worker.lost", reason=value, host=self.host)
            self._events.process_lost(value)

    def _placement_finished(self, finished: asyncio.Future[str]) -> None:
        if self._reported or self._closed:
            return
        if self._outcome is not None:
            self._report()
            return
        how = finished.result() if not finished.cancelled() else "cancelled"
        # The exit status normally arrives first; give it a moment in case it is on its way.
        self._end_timer = self._loop.call_later(
            _PLACEMENT_END_GRACE, self.lost, f"the worker's shim ended ({how})"
        )

    def _cancel_timers(self) -> None:
        for timer in (self._kill_timer, self._end_timer):
            if timer is not None:
                timer.cancel()
        self._kill_timer = self._end_timer = None

    def _negotiate(self, wire: int) -> None:
        """Stream buffers to a worker that said it reads them; inline to an older one."""
        encoder = self._encoder
        if encoder is None or encoder.streaming:
            return
        if wire >= WIRE_STREAMED:
            encoder.enable(self.spec.large_buffer_threshold, self.spec.compression)
        elif self.spec.compression:
            self._log.warning(
                "worker.no_streamed_buffers",
                detail="its corral sends buffers inline: compression is off for it",
                compression=self.spec.compression,
            )

    # --- LaunchedWorker ---------------------------------------------------------

    def _signal(self, how: str) -> None:
        if self._outcome is not None or self._supervision is None or self._supervision.is_closing():
            return
        encoder = FrameEncoder(_SUPERVISION_LIMIT)
        self._supervision.write(encoder.encode(ShimSignal(how)))

    def terminate(self) -> None:
        """SIGTERM to the worker's process group, through its shim."""
        self._signal("term")

    def kill(self) -> None:
        """SIGKILL the worker's group, through its shim; stopped by force if it cannot say."""
        if self._outcome is not None:
            return
        self._signal("kill")
        if self._kill_timer is None:
            self._kill_timer = self._loop.call_later(
                self._kill_timeout,
                self.lost,
                f"no exit status within {self._kill_timeout}s of being killed",
            )

    def forget_after_fork(self) -> None:
        """In a forked child: drop our copies of the sockets, touch nothing else.

        Otherwise the child would keep the supervision connection open, and
        the shim would not see the pool's death.
        """
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def force_kill(self) -> None:
        """Stop the shim through whatever placed it (``ray.kill``)."""
        self.placement.stop()

    def close(self) -> None:
        """Close every connection and let go of the placement; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timers()
        connection = getattr(self, "connection", None)
        if connection is not None:
            connection.close()
        if self._supervision is not None:
            self._supervision.close()
        # Let go of the placement too: a Ray actor would hold its resources on.
        self.placement.stop()
        self._on_close()


class ShimLauncher(NothingHeld):
    """Places a shim per worker (the subclass says where) and lets it connect back.

    The listener opens with the first launch and closes when no worker of
    this launcher is left, so a launcher needs no closing of its own.
    """

    same_host = False  # whether /proc on this host shows the workers (RSS, rlimits)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        start_timeout: float = 60.0,
        handshake_timeout: float = 10.0,
        kill_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.advertise_host = advertise_host
        self.start_timeout = check_seconds(start_timeout, "start_timeout")
        self.handshake_timeout = check_seconds(handshake_timeout, "handshake_timeout")
        self.kill_timeout = check_seconds(kill_timeout, "kill_timeout")
        self._listener: Listener | None = None
        self._users = 0

    # --- for subclasses ---------------------------------------------------------

    async def _place(self, spec: WorkerSpec, order: ShimOrder, key: bytes) -> Placement:
        """Start a shim for ``order`` somewhere; it must not wait for the shim to connect."""
        raise NotImplementedError

    def _order(self, spec: WorkerSpec, host: str, port: int, ticket: Ticket) -> ShimOrder:
        """The order a remote shim gets: the pool's environment does not travel."""
        return ShimOrder(
            host=host,
            port=port,
            ticket_id=ticket.id,
            worker_id=spec.worker_id,
            target=spec.target,
            python=spec.python,
            env=dict(spec.env),
            env_allowlist=spec.env_allowlist,
            cwd=spec.cwd,
            max_message_size=spec.max_message_size,
            single_threaded_math=spec.single_threaded_math,
            connect_timeout=self.handshake_timeout,
            stream_threshold=spec.large_buffer_threshold,
            compression=spec.compression,
        )

    def _placement_ended(
        self, spec: WorkerSpec, placement: Placement, how: str, listener_busy: bool
    ) -> WorkerStartError:
        """The error for a shim that ended before it connected back: whose failure was it?

        ``listener_busy``: the listener turned connections away for load while
        this launch waited (the shim gave up knocking): not the worker's failure.
        A subclass that can ask its cluster (``corral.ray``) also tells a lost
        node apart. Anything else counts: the worker's code, or a configuration
        the pool must report (a wrong ``advertise_host``...).
        """
        message = f"worker {spec.worker_id} could not be placed or connect back: {how}"
        if listener_busy:
            return PlacementError(
                message + " (the pool's listener was turning connections away for load)",
                cause="listener_busy",
                worker_id=spec.worker_id,
            )
        return WorkerStartError(message, worker_id=spec.worker_id)

    def _start_timed_out(self, spec: WorkerSpec, placement: Placement) -> WorkerStartError:
        return WorkerStartError(
            f"worker {spec.worker_id} did not connect back within start_timeout="
            f"{self.start_timeout}s ({placement.describe()})",
            worker_id=spec.worker_id,
        )

    # --- the listener -------------------------------------------------------------

    @property
    def listener(self) -> Listener | None:
        """The listener, while any worker of this launcher is starting or alive."""
        return self._listener

    def _acquire(self) -> Listener:
        if self._listener is None:
            listener = Listener(
                self.host,
                self.port,
                advertise_host=self.advertise_host,
                handshake_timeout=self.handshake_timeout,
            )
            listener.open()
            self._listener = listener
        self._users += 1
        return self._listener

    def _release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._listener is not None:
            self._listener.close()
            self._listener = None

    # --- Launcher -------------------------------------------------------------------

    async def launch(self, spec: WorkerSpec, events: WorkerEvents) -> RemoteWorker:
        """Place a shim, wait (up to ``start_timeout``) for it to connect and start the worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        listener = self._acquire()
        ticket = listener.tickets.issue(self.start_timeout + self.handshake_timeout)
        placement: Placement | None = None
        worker: RemoteWorker | None = None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()

        try:
            order = self._order(spec, listener.advertise_host, listener.port, ticket)
            busy_before = listener.busy
            placement = await self._place(spec, order, ticket.key)
            sockets = await self._connections(spec, ticket, placement, deadline, busy_before)
            worker = RemoteWorker(
                spec,
                events,
                placement,
                kill_timeout=self.kill_timeout,
                same_host=self.same_host,
                on_close=release,
            )
            await worker.attach(sockets)
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(worker.started)
            except TimeoutError:
                raise self._start_timed_out(spec, placement) from None
        except BaseException:
            for future in ticket.accepted.values():
                if future.done() and not future.cancelled() and worker is None:
                    future.result().close()
            if worker is not None:
                worker.close()
            elif placement is not None:
                placement.stop()
            release()
            if placement is not None:
                # Leave nothing running: wait (bounded) until the shim is gone.
                await asyncio.wait([placement.finished], timeout=self.kill_timeout)
            raise
        finally:
            listener.tickets.revoke(ticket)
        worker._log.info("worker.placed", host=worker.host, shepherd_pid=worker.pid)
        return worker

    async def _connections(
        self,
        spec: WorkerSpec,
        ticket: Ticket,
        placement: Placement,
        deadline: float,
        busy_before: int,
    ) -> dict[Role, socket.socket]:
        waiting: set[asyncio.Future[Any]] = {*ticket.accepted.values(), placement.finished}
        loop = asyncio.get_running_loop()
        while not all(f.done() for f in ticket.accepted.values()):
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, deadline - loop.time()), return_when="FIRST_COMPLETED"
            )
            if not done:
                error = self._start_timed_out(spec, placement)
                if not any(f.done() for f in ticket.accepted.values()):
                    # Nothing of the worker ever ran here: nowhere to place it in time.
                    error = PlacementError(
                        error.message, cause="placement", worker_id=spec.worker_id
                    )
                raise error
            if placement.finished in done:
                listener = self._listener
                busy = listener is not None and listener.busy > busy_before
                raise self._placement_ended(spec, placement, placement.finished.result(), busy)
            waiting -= done
        return {role: future.result() for role, future in ticket.accepted.items()}


class _SubprocessPlacement:
    def __init__(self, process: asyncio.subprocess.Process, command: str) -> None:
        self.process = process
        self._command = command
        self._finished: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._stderr = b""
        self._watch = asyncio.get_running_loop().create_task(self._wait())

    @property
    def finished(self) -> asyncio.Future[str]:
        return self._finished

    async def _wait(self) -> None:
        assert self.process.stderr is not None
        self._stderr = await self.process.stderr.read()
        code = await self.process.wait()
        if not self._finished.done():
            tail = self._stderr.decode(errors="replace").strip()[-2000:]
            self._finished.set_result(
                f"shim exited with code {code}" + (f": {tail}" if tail else "")
            )

    def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def describe(self) -> str:
        return f"shim process {self.process.pid}: {self._command}"


class SubprocessShimLauncher(ShimLauncher):
    """Runs each worker's shim as a local subprocess that connects back over TCP.

    The same code path as a cluster launcher (listener, handshake, shim, socket
    transport), on this host: for tests, and for anyone who wants workers that
    reach the pool over TCP. The shim gets the pool's environment (as a local
    worker would) and its ticket key on stdin.
    """

    same_host = True

    async def _place(self, spec: WorkerSpec, order: ShimOrder, key: bytes) -> Placement:
        # The pool's environment (sys.path included) is applied here, as the
        # local launcher does; the shim adds nothing to it.
        local_order = msgspec.structs.replace(order, env={}, env_allowlist=None)
        command = [sys.executable, "-m", "corral._launch._shim"]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=spec.environment(),
                cwd=spec.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerStartError(
                f"cannot start the shim for worker {spec.worker_id}: {exc}",
                worker_id=spec.worker_id,
            ) from exc
        assert process.stdin is not None
        process.stdin.write(shim_input(local_order, key))
        process.stdin.close()
        return _SubprocessPlacement(process, " ".join(command))
