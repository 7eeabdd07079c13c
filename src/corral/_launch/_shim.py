"""The remote side of a placed worker: connect back, authenticate, start the worker, watch it.

Runs where a cluster scheduler put it (inside a Ray actor, or as
``python -m corral._launch._shim`` for tests and hand placement), in one thread, with
no event loop. It
- opens three TCP connections to the pool (supervision, data, control), each
  through the HMAC handshake of ``_handshake``;
- starts the ordinary worker (``python -m corral.worker``) under the usual
  shepherd, as a plain child process with its own process group, handing it
  the data socket as its read and write descriptors and the control socket as
  its control descriptor: calls never pass through this process;
- forwards the worker's stderr to the pool over the supervision connection,
  and when the worker ends, its exit status (then it returns that status);
- obeys ``terminate``/``kill`` from the pool, and treats the end of the
  supervision connection as the pool's death: the worker's group is killed;
- if this process itself dies, the shepherd's lifeline closes and the
  shepherd kills the worker's group (the worker also has PR_SET_PDEATHSIG).

Must not touch: the calls (they go straight from the pool to the worker) or
anything of the placing system (Ray): it gets an order and a key, nothing else.
The key arrives as an argument or on stdin, never in argv or the environment.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import msgspec

from .._compression import check_compression
from .._framing import FrameDecoder, FrameEncoder
from .._streamed import WIRE_PLAIN, WIRE_STREAMED
from ._handshake import HandshakeError, ListenerBusy, Role, client_handshake
from ._spawn import shepherd_command
from ._spec import WorkerSpec

__all__ = [
    "ShimExited",
    "ShimFailed",
    "ShimMessage",
    "ShimOrder",
    "ShimSignal",
    "ShimStarted",
    "ShimStderr",
    "run_shim",
    "shim_input",
]

_SUPERVISION_LIMIT = 1024 * 1024  # frames on the supervision connection are small
_STDERR_CHUNK = 65536
_SEND_TIMEOUT = 30.0  # a pool that takes no bytes for this long is gone
_DRAIN_AFTER_EXIT = 0.5  # how long the last stderr bytes may take after the exit
# Keepalive: a pool that vanished without closing (its host went away) is
# noticed within about IDLE + INTERVAL * COUNT seconds.
_KEEPALIVE_IDLE = 10
_KEEPALIVE_INTERVAL = 5
_KEEPALIVE_COUNT = 3
# A listener that closed us before its greeting was at its limit: try again.
_BUSY_RETRY_FIRST = 0.01
_BUSY_RETRY_MAX = 0.5


class ShimOrder(msgspec.Struct, frozen=True):
    """What a shim needs to start one worker: where to connect and what to run.

    The ticket's key is not part of the order: it travels separately.
    """

    host: str
    port: int
    ticket_id: bytes
    worker_id: str
    target: str
    python: str | None = None  # None: this process's interpreter
    env: dict[str, str] = msgspec.field(default_factory=dict)
    env_allowlist: tuple[str, ...] | None = None
    cwd: str | None = None
    max_message_size: int = 0
    single_threaded_math: bool = True
    connect_timeout: float = 30.0
    # Streamed buffers (``corral._streamed``): array buffers over this many
    # bytes follow their frame (0: inline, as a shim that does not know this
    # field does), compressed with ``compression``. The shim answers with
    # ``ShimStarted.wire``: what the worker it started speaks.
    stream_threshold: int = 0
    compression: str | None = None


# --- the supervision channel: shim <-> pool, after the handshake ------------------


class _ShimMsg(msgspec.Struct, frozen=True, array_like=True, tag_field="t"):
    """Base of the supervision messages."""


class ShimStarted(_ShimMsg, tag=1, frozen=True):
    """The worker's shepherd is running: its pid, the host and the node it runs on.

    ``node_id`` is the placing system's id of the node (Ray's node id), else the
    host name; ``node_address`` the node's address (the one the shim connected
    from, unless the placing system says). ``wire``: 2 if the worker streams
    buffers after their frames (``corral._streamed``) and reads them so, 1 if
    it knows only plain frames (what a shim too old to say anything means).
    """

    pid: int
    host: str
    node_id: str = ""
    node_address: str = ""
    wire: int = WIRE_PLAIN


class ShimStderr(_ShimMsg, tag=2, frozen=True):
    """Bytes the worker (or its shepherd) wrote to stderr."""

    data: bytes


class ShimExited(_ShimMsg, tag=3, frozen=True):
    """The worker has ended and been reaped: its exit code (negative: a signal)."""

    returncode: int


class ShimFailed(_ShimMsg, tag=4, frozen=True):
    """The worker could not be started at all."""

    message: str


class ShimSignal(_ShimMsg, tag=5, frozen=True):
    """From the pool: ``"term"`` (SIGTERM to the group) or ``"kill"`` (SIGKILL to it)."""

    how: str


ShimMessage = ShimStarted | ShimStderr | ShimExited | ShimFailed | ShimSignal


def _tune(sock: socket.socket, nodelay: bool) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", _KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect_once(order: ShimOrder, key: bytes, role: Role, timeout: float) -> socket.socket:
    sock = socket.create_connection((order.host, order.port), timeout=timeout)
    try:
        _tune(sock, nodelay=role is not Role.SUPERVISION)
        client_handshake(sock, order.ticket_id, key, role)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(order: ShimOrder, key: bytes, role: Role) -> socket.socket:
    """Connect and authenticate; while the pool's listener is busy, again, with backoff.

    Gives up (``ListenerBusy``) after ``connect_timeout`` seconds of refusals.
    """
    deadline = time.monotonic() + order.connect_timeout
    delay = _BUSY_RETRY_FIRST
    while True:
        left = deadline - time.monotonic()
        try:
            return _connect_once(order, key, role, max(left, _BUSY_RETRY_FIRST))
        except ListenerBusy as exc:
            if time.monotonic() + delay >= deadline:
                raise ListenerBusy(
                    f"the pool's listener stayed busy for {order.connect_timeout}s: {exc}"
                ) from exc
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, _BUSY_RETRY_MAX)


class _Supervised:
    """The worker's shepherd as this shim sees it."""

    def __init__(self, proc: subprocess.Popen[bytes], lifeline: int) -> None:
        self.proc = proc
        self.lifeline = lifeline

    def signal(self, how: str) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # The shepherd forwards SIGTERM to the group and kills it on SIGUSR1.
            os.kill(self.proc.pid, signal.SIGTERM if how == "term" else signal.SIGUSR1)
        if how != "term":
            self.close_lifeline()

    def close_lifeline(self) -> None:
        if self.lifeline >= 0:
            os.close(self.lifeline)
            self.lifeline = -1


def _start_worker(
    order: ShimOrder, data: socket.socket, control: socket.socket
) -> tuple[subprocess.Popen[bytes], int]:
    spec = WorkerSpec(
        worker_id=order.worker_id,
        target=order.target,
        python=order.python or sys.executable,
        env=order.env,
        cwd=order.cwd,
        max_message_size=order.max_message_size,
        env_allowlist=order.env_allowlist,
        single_threaded_math=order.single_threaded_math,
        stream_threshold=order.stream_threshold,
        compression=order.compression,
    )
    for sock in (data, control):
        sock.settimeout(None)  # the worker expects blocking descriptors
    read_fd = data.fileno()
    write_fd = os.dup(read_fd)  # the worker closes its read and write ends separately
    control_fd = control.fileno()
    lifeline_r, lifeline_w = os.pipe()
    child_fds = (read_fd, write_fd, control_fd, lifeline_r)
    try:
        proc = subprocess.Popen(
            shepherd_command(lifeline_r, spec.command(read_fd, write_fd, control_fd)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=child_fds,
            close_fds=True,
            start_new_session=True,
            env=spec.environment(),
            cwd=spec.cwd,
        )
    except BaseException:
        os.close(lifeline_w)
        raise
    finally:
        os.close(write_fd)
        os.close(lifeline_r)
    return proc, lifeline_w


def _drain(stderr: int, deadline: float) -> bytes:
    """What is left in the stderr pipe, up to EOF or the deadline."""
    chunks = []
    os.set_blocking(stderr, False)
    with selectors.DefaultSelector() as sel:
        sel.register(stderr, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            try:
                data = os.read(stderr, _STDERR_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def run_shim(
    order: ShimOrder, key: bytes, node_id: str | None = None, node_address: str | None = None
) -> int:
    """Connect, start the worker, supervise it; returns the worker's exit status.

    ``node_id`` and ``node_address`` say where this runs, as the placing system
    knows it (default: the host name, and the address the shim connected from).
    Raises (HandshakeError, OSError) if the pool cannot be reached or refuses
    us; nothing was started then.
    """
    sockets: list[socket.socket] = []
    try:
        for role in (Role.SUPERVISION, Role.DATA, Role.CONTROL):
            sockets.append(_connect(order, key, role))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    supervision, data, control = sockets
    encoder = FrameEncoder(_SUPERVISION_LIMIT)
    try:
        try:
            check_compression(order.compression)  # its package must be here too
            proc, lifeline = _start_worker(order, data, control)
        finally:
            # Only the worker holds the protocol sockets from here: when it dies,
            # the pool sees them close.
            data.close()
            control.close()
    except (OSError, ImportError, ValueError, TypeError) as exc:
        with contextlib.suppress(OSError):
            supervision.sendall(encoder.encode(ShimFailed(f"cannot start the worker: {exc}")))
        supervision.close()
        return 127
    supervision.settimeout(_SEND_TIMEOUT)
    supervisor = _Supervisor(_Supervised(proc, lifeline), supervision, encoder)
    host = socket.gethostname()
    try:
        local_address = str(supervision.getsockname()[0])
    except OSError:
        local_address = ""
    wire = WIRE_STREAMED if order.stream_threshold else WIRE_PLAIN
    supervisor.send(
        ShimStarted(proc.pid, host, node_id or host, node_address or local_address, wire)
    )
    return supervisor.run()


class _Supervisor:
    """The shim's loop: the worker's stderr and exit, and the pool's connection."""

    def __init__(
        self, worker: _Supervised, supervision: socket.socket, encoder: FrameEncoder
    ) -> None:
        self.worker = worker
        self.pool: socket.socket | None = supervision
        self.encoder = encoder
        self.decoder: FrameDecoder[Any] = FrameDecoder(ShimMessage, _SUPERVISION_LIMIT)  # type: ignore[arg-type]
        self.sel = selectors.DefaultSelector()

    def send(self, message: Any) -> None:
        if self.pool is None:
            return
        try:
            self.pool.sendall(self.encoder.encode(message))
        except OSError:
            self.pool_gone()

    def pool_gone(self) -> None:
        """The pool is gone (or broke the protocol): nothing may outlive it."""
        if self.pool is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.pool)
            self.pool.close()
            self.pool = None
        self.worker.signal("kill")

    def from_pool(self) -> None:
        assert self.pool is not None
        try:
            received = self.pool.recv(_STDERR_CHUNK)
            messages = self.decoder.feed(received) if received else None
        except (OSError, ValueError):
            messages = None  # a broken connection, or garbage on it
        if messages is None:
            self.pool_gone()
            return
        for message in messages:
            if isinstance(message, ShimSignal):
                self.worker.signal(message.how)

    def run(self) -> int:
        proc = self.worker.proc
        assert proc.stderr is not None
        stderr = proc.stderr.fileno()
        try:
            exited: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            exited = None
        sel = self.sel
        try:
            sel.register(stderr, selectors.EVENT_READ, "stderr")
            if exited is not None:
                sel.register(exited, selectors.EVENT_READ, "exited")
            if self.pool is not None:
                sel.register(self.pool, selectors.EVENT_READ, "pool")
            while proc.poll() is None:
                for key, _ in sel.select(None if exited is not None else 0.05):
                    if key.data == "stderr":
                        chunk = os.read(stderr, _STDERR_CHUNK)
                        if chunk:
                            self.send(ShimStderr(chunk))
                        else:
                            sel.unregister(stderr)
                    elif key.data == "pool" and self.pool is not None:
                        self.from_pool()
            returncode = proc.wait()
            rest = _drain(stderr, time.monotonic() + _DRAIN_AFTER_EXIT)
            if rest:
                self.send(ShimStderr(rest))
            self.send(ShimExited(returncode))
            return returncode
        finally:
            sel.close()
            self.worker.close_lifeline()
            if exited is not None:
                os.close(exited)
            proc.stderr.close()
            if self.pool is not None:
                with contextlib.suppress(OSError):
                    self.pool.shutdown(socket.SHUT_RDWR)
                self.pool.close()


class _ShimInput(msgspec.Struct, frozen=True):
    order: ShimOrder
    key: bytes


def shim_input(order: ShimOrder, key: bytes) -> bytes:
    """What ``python -m corral._launch._shim`` reads on its stdin."""
    return msgspec.json.encode(_ShimInput(order, key))


def main() -> None:
    """``python -m corral._launch._shim``: the order and key as one JSON object on stdin."""
    given = msgspec.json.decode(sys.stdin.buffer.read(), type=_ShimInput)
    try:
        code = run_shim(given.order, given.key)
    except (OSError, HandshakeError) as exc:
        sys.stderr.write(f"corral shim: {type(exc).__name__}: {exc}\n")
        sys.exit(1)
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
