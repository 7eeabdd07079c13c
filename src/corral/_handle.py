"""The pool's handle on one worker process.

Owns: one worker's lifecycle as the parent sees it: start and handshake, the
calls in flight keyed by correlation id (one ``PendingCall`` and one future
each), their deadlines and cancellation, the stderr tail, heartbeats, and
turning the worker's death into one typed error per pending call. Must not
touch: placement, waiting callers or other workers (the dispatcher), nor the
policies that retire a worker (the supervisor); it reports capacity changes and
its exit through callbacks. ``sessions`` and ``claimed`` are the sessions
index's and the dispatcher's marks on this worker, read by the router; the
handle never writes them.

Exactly-once: a pending call is settled once, by its first terminal frame, by
its CancelAck, or by the worker's death. A frame for an id that was never issued
or was already settled (and not cancelled) is a protocol violation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ._errors import (
    CallTimeout,
    CorralError,
    EncodeError,
    MethodNotFound,
    PayloadTooLarge,
    PlacementError,
    PoolClosed,
    ProtocolError,
    RemoteError,
    SessionLost,
    WorkerCrashed,
    WorkerStartError,
    describe_exit,
)
from ._launch import LaunchedWorker, Launcher, WorkerSpec
from ._log import get_logger
from ._messages import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    CancelAck,
    Chunk,
    Credit,
    End,
    EndSession,
    Error,
    ErrorKind,
    Hello,
    Ping,
    Pong,
    Result,
    Shutdown,
)
from ._shm import LostSegment, unlink_segments
from ._state import WorkerState, check_transition
from ._transport import TruncatedStream

__all__ = ["PendingCall", "WorkerHandle"]

STDERR_TAIL_LINES = 40
STDERR_TAIL_BYTES = 8192
_STDERR_LINE_MAX = 4096
_EXIT_TAIL_WAIT = 0.05  # after exit, how long to wait for the last stderr bytes
_EOF_EXIT_WAIT = 1.0  # after the wire closes, how long the worker has to exit
_END = object()
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _signal_name(exit_code: int | None) -> str | None:
    """``"SIGKILL"`` for an exit code of -9; None for a normal exit."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def rss_of(pid: int) -> int | None:
    """Resident memory of a process in bytes, from /proc (Linux); None if unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class PendingCall:
    """One call in flight on one worker; settled exactly once."""

    __slots__ = (
        "_items",
        "_waiter",
        "cancelling",
        "deadline_timer",
        "future",
        "grace_timer",
        "id",
        "method",
        "session",
        "stream_window",
        "taken",
    )

    def __init__(
        self,
        call_id: int,
        method: str,
        session: str | None,
        future: asyncio.Future[Any],
        stream_window: int,
    ) -> None:
        self.id = call_id
        self.method = method
        self.session = session
        self.future = future
        self.cancelling = False
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.grace_timer: asyncio.TimerHandle | None = None
        self.stream_window = stream_window
        self._items: collections.deque[Any] | None = collections.deque() if stream_window else None
        self._waiter: asyncio.Future[None] | None = None
        self.taken = 0

    # stream side: items are queued until the consumer takes them
    def push(self, item: Any) -> None:
        assert self._items is not None
        self._items.append(item)
        self.wake()

    def wake(self) -> None:
        """Wake a stream consumer waiting in ``next_item``."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, outcome: Any = _END) -> None:
        """Settle the caller's side: a value, or an exception instance."""
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
            # A stream consumer may never look at it; do not warn about that.
            self.future.exception()
        else:
            self.future.set_result(outcome)
        self.wake()

    async def next_item(self) -> Any:
        """Next stream item; ``_END`` when the stream is over; raises its error."""
        items = self._items
        assert items is not None
        while not items:
            if self.future.done():
                outcome = self.future.result()  # raises the call's error
                if outcome is _END:
                    return _END
                # a plain handler called through stream(): its one result
                self.future = self.future.get_loop().create_future()
                self.future.set_result(_END)
                return outcome
            self._waiter = self.future.get_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.taken += 1
        return items.popleft()


class WorkerHandle:
    """A worker process seen from the pool; all methods run on the pool's loop."""

    def __init__(
        self,
        spec: WorkerSpec,
        launcher: Launcher,
        *,
        max_concurrency: int,
        cancel_grace: float,
        on_capacity: Callable[[WorkerHandle], None],
        on_exit: Callable[[WorkerHandle], None],
        pool_name: str,
        on_output: Callable[[WorkerHandle], None] | None = None,
        rlimits: Mapping[str, int] | None = None,
        memory_limit: int | None = None,
    ) -> None:
        self.spec = spec
        self.id = spec.worker_id
        self.max_concurrency = max_concurrency
        self.cancel_grace = cancel_grace
        self._launcher = launcher
        self._on_capacity = on_capacity
        self._on_exit = on_exit
        self._on_output = on_output
        self._rlimits = dict(rlimits or {})
        self._loop = asyncio.get_running_loop()
        self.state = WorkerState.STARTING
        self.pid: int | None = None  # the worker's own pid, from its Hello
        self.handlers: tuple[str, ...] = ()
        self.exit_code: int | None = None
        # Where it runs, for a placed worker (None for a local one): the node's
        # id and address, as its launcher reports them.
        self.node_id: str | None = None
        self.node_address: str | None = None
        self._lost_reason: str | None = None  # lost without an exit status
        self.sessions: set[str] = set()  # written by Sessions alone
        self.sessions_reported_lost: set[str] = set()  # this handle told a caller so
        self.leased = False
        self.claimed = False  # drained for a waiting checkout (the dispatcher's mark)
        self.recycle_reason: str | None = None  # set once it is draining to be recycled
        self.memory_limit = memory_limit  # to tell an OOM kill in the exit message
        self.rss: int | None = None  # last sample of the worker's resident memory
        self.reserved = 0
        self.unacked_cancels = 0
        self.calls_served = 0
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self.idle_since = self.started_at  # when it last had nothing in flight
        self.kill_reason: str | None = None
        self.closing = False  # the pool is shutting this worker down
        self._pending: dict[int, PendingCall] = {}
        self._next_id = 1
        self._launched: LaunchedWorker | None = None
        self._send: Callable[[Any], int] | None = None  # while calls may be sent
        self._finalizing: asyncio.Task[None] | None = None
        self._hello: asyncio.Future[Hello] = self._loop.create_future()
        self._exited = asyncio.Event()
        self._stderr_done = asyncio.Event()
        self._stderr_partial = b""
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._ping_seq = 0
        self._truncated: ProtocolError | None = None  # the wire ended inside a frame
        self.last_pong = time.monotonic()
        self._ping_sent_at: float | None = None
        self._log = get_logger("corral").bind(pool=pool_name, worker_id=self.id)

    # --- derived state --------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Slots in use: reserved for a caller, or a call not yet settled."""
        return self.reserved + len(self._pending)

    @property
    def stderr_tail(self) -> str:
        lines = list(self._stderr_tail)
        if self._stderr_partial:
            lines.append(self._stderr_partial.decode(errors="replace"))
        text = "\n".join(lines)
        return text[-STDERR_TAIL_BYTES:]

    def _set_state(self, new: WorkerState) -> None:
        if new is not self.state:
            check_transition(self.state, new)
            self.state = new

    def _refresh_busy(self) -> None:
        # READY <-> BUSY, both legal in the table, on every call: kept cheap.
        state = self.state
        if state is WorkerState.READY:
            if self.leased or self.reserved or self._pending:
                self.state = WorkerState.BUSY
        elif state is WorkerState.BUSY and not (self.leased or self.reserved or self._pending):
            self.state = WorkerState.READY
            self.idle_since = time.monotonic()

    def _error_context(self, pending: PendingCall | None = None) -> dict[str, Any]:
        context: dict[str, Any] = {"worker_id": self.id, "pid": self.pid}
        if pending is not None:
            context.update(method=pending.method, call_id=pending.id, session=pending.session)
        return context

    # --- start ----------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Spawn the worker and wait for its Hello; raises WorkerStartError."""
        self._log.debug("worker.spawning", target=self.spec.target)
        try:
            self._launched = await self._launcher.launch(self.spec, self)
        except WorkerStartError:
            self._mark_dead_without_process()
            raise
        self._log = self._log.bind(shepherd_pid=self._launched.pid)
        self.node_id = self._launched.node_id
        self.node_address = self._launched.node_address
        if self.node_id is not None:
            self._log = self._log.bind(node_id=self.node_id, node_address=self.node_address)
        self._log.info("worker.started", target=self.spec.target)
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            waiting: set[asyncio.Future[Hello] | asyncio.Future[Literal[True]]] = {
                self._hello,
                exited,
            }
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            exited.cancel()
            self.kill("start was cancelled")
            raise
        exited.cancel()
        if self._hello in done and not self._hello.cancelled():
            hello = self._hello.result()
            if hello.protocol != PROTOCOL_VERSION:
                self.kill(f"protocol version {hello.protocol}, expected {PROTOCOL_VERSION}")
                raise WorkerStartError(
                    f"worker speaks protocol version {hello.protocol}, this pool speaks "
                    f"{PROTOCOL_VERSION}",
                    worker_id=self.id,
                    pid=hello.pid,
                )
            self.pid = hello.pid
            self.handlers = tuple(hello.handlers)
            if self._rlimits:
                if not self._launched.same_host:
                    self.kill("worker_rlimits need workers on this host")
                    raise WorkerStartError(
                        "worker_rlimits apply only to workers on the pool's host; this "
                        "launcher places them elsewhere (use the placement's own limits)",
                        worker_id=self.id,
                        pid=hello.pid,
                    )
                self._apply_rlimits(hello.pid)
            self.ready_at = time.monotonic()
            self.idle_since = self.ready_at
            self.last_pong = self.ready_at
            self._set_state(WorkerState.READY)
            self._send = self._launched.connection.send
            self._log = self._log.bind(pid=self.pid)
            self._log.info(
                "worker.ready", startup_seconds=round(self.ready_at - self.started_at, 4)
            )
            return
        if not self._exited.is_set():
            self.kill(f"no handshake within startup_timeout={timeout}s")
            await self.wait_exited(5.0)
            raise WorkerStartError(
                f"worker {self.id} did not become ready within {timeout}s "
                f"(target {self.spec.target!r})",
                worker_id=self.id,
                stderr_tail=self.stderr_tail,
            )
        await self._wait_stderr_tail()
        if self._lost_reason is not None:
            # No exit status: its shim or node went away, the worker's code did not fail.
            raise PlacementError(
                f"worker {self.id} was lost during start-up: {self._lost_reason}",
                cause="lost",
                worker_id=self.id,
                stderr_tail=self.stderr_tail,
            )
        raise WorkerStartError(
            f"worker {self.id} exited during start-up ({describe_exit(self.exit_code)}) "
            f"while loading {self.spec.target!r}",
            worker_id=self.id,
            exit_code=self.exit_code,
            stderr_tail=self.stderr_tail,
        )

    def _apply_rlimits(self, pid: int) -> None:
        """Limit the worker from outside (prlimit): no code runs in the child for it."""
        import resource

        for name, value in self._rlimits.items():
            limit = getattr(resource, f"RLIMIT_{name.upper()}")
            try:
                resource.prlimit(pid, limit, (value, value))
            except (OSError, ValueError) as exc:
                self.kill(f"cannot apply worker_rlimits {name}={value}: {exc}")
                raise WorkerStartError(
                    f"cannot apply worker_rlimits {name}={value} to worker {self.id}: {exc}",
                    worker_id=self.id,
                    pid=pid,
                ) from exc

    def _mark_dead_without_process(self) -> None:
        self.state = WorkerState.DEAD
        self._exited.set()
        self._stderr_done.set()

    # --- calls ----------------------------------------------------------------

    def reserve(self, exclusive: bool = False) -> None:
        """Claim a slot (or, exclusive, the whole worker) for a caller."""
        if exclusive:
            self.leased = True
        else:
            self.reserved += 1
        if self.state is WorkerState.READY:  # ``_refresh_busy``, inlined: now it is busy
            self.state = WorkerState.BUSY

    def unreserve(self) -> None:
        """Give back a slot claimed with ``reserve()`` but never used."""
        self.reserved -= 1
        self._refresh_busy()
        self._on_capacity(self)

    def give_back(self, exclusive: bool) -> None:
        """Undo ``reserve(exclusive)`` for a caller that will not use the worker."""
        if exclusive:
            self.release_lease()
        else:
            self.unreserve()

    def release_lease(self) -> None:
        self.leased = False
        self._refresh_busy()
        self._on_capacity(self)

    def send_call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        session: str | None,
        deadline: float | None,
        *,
        stream_window: int = 0,
        reserved: bool = True,
        trace: str | None = None,
        future: asyncio.Future[Any] | None = None,
    ) -> PendingCall:
        """Send a Call using a reserved slot. Raises with nothing sent and the slot freed.

        ``trace`` is the caller's W3C traceparent, passed on to the worker.
        ``future``: the one the outcome settles (a queued call's, made when it
        queued); a new one if None.
        """
        if reserved:
            self.reserved -= 1
        send = self._send
        if send is None or self.kill_reason is not None:
            self._refresh_busy()
            self._on_capacity(self)
            if session is not None:
                self.sessions_reported_lost.add(session)
            raise (SessionLost if session is not None else WorkerCrashed)(
                f"worker {self.id} is gone ({self.kill_reason or describe_exit(self.exit_code)})",
                worker_id=self.id,
                pid=self.pid,
                method=method,
                session=session,
                exit_code=self.exit_code,
            )
        call_id = self._next_id
        loop = self._loop
        try:
            send(
                Call(
                    call_id,
                    method,
                    args,
                    kwargs,
                    session,
                    None if deadline is None else deadline - loop.time(),
                    stream_window > 0,
                    stream_window,
                    trace,
                )
            )
        except (EncodeError, PayloadTooLarge) as exc:
            self._refresh_busy()
            self._on_capacity(self)
            raise type(exc)(
                f"an argument of {method!r} cannot be encoded: {exc.__cause__}"
                if isinstance(exc, EncodeError)
                else f"call to {method!r} not sent: {exc.message}",
                worker_id=self.id,
                pid=self.pid,
                method=method,
                session=session,
            ) from exc.__cause__
        self._next_id = call_id + 1
        if future is None:
            future = loop.create_future()
        pending = PendingCall(call_id, method, session, future, stream_window)
        self._pending[call_id] = pending  # the reserved slot becomes this call: still busy
        if deadline is not None:
            pending.deadline_timer = loop.call_at(deadline, self._deadline_passed, pending)
        return pending

    def _deadline_passed(self, pending: PendingCall) -> None:
        pending.deadline_timer = None
        if pending.future.done() or pending.cancelling:
            return
        pending.finish(
            CallTimeout(
                f"call {pending.method!r} ran past its deadline",
                **self._error_context(pending),
            )
        )
        self.cancel(pending)

    def cancel(self, pending: PendingCall, error: CorralError | None = None) -> None:
        """Stop a call in the worker. Frees its slot on CancelAck, or evicts after the grace.

        The caller's side ends at once: with ``error`` if given, else cancelled.
        """
        if pending.id not in self._pending or pending.cancelling:
            return
        pending.cancelling = True
        if pending.deadline_timer is not None:
            pending.deadline_timer.cancel()
            pending.deadline_timer = None
        if not pending.future.done():
            if error is not None:
                pending.finish(error)
            else:
                pending.future.cancel()
                pending.wake()
        self.unacked_cancels += 1
        assert self._launched is not None
        self._launched.connection.send_control(Cancel(pending.id))
        pending.grace_timer = self._loop.call_later(
            self.cancel_grace, self._cancel_not_acknowledged, pending
        )

    def _cancel_not_acknowledged(self, pending: PendingCall) -> None:
        pending.grace_timer = None
        if self._pending.get(pending.id) is pending:
            self.kill(
                f"call {pending.id} ({pending.method!r}) did not stop within "
                f"cancel_grace={self.cancel_grace}s of being cancelled"
            )

    def grant_credit(self, pending: PendingCall) -> None:
        """The consumer took stream items: let the worker send as many more."""
        if pending.taken and pending.id in self._pending and not pending.cancelling:
            n, pending.taken = pending.taken, 0
            assert self._launched is not None
            self._launched.connection.send(Credit(pending.id, n))

    def _settle(self, pending: PendingCall) -> None:
        del self._pending[pending.id]
        if pending.deadline_timer is not None:
            pending.deadline_timer.cancel()
        if pending.grace_timer is not None:
            pending.grace_timer.cancel()
        if pending.cancelling:
            self.unacked_cancels -= 1
        else:
            self.calls_served += 1
        self._refresh_busy()
        self._on_capacity(self)

    def end_session(self, session: str) -> None:
        """Tell the worker to drop a session's state (``Sessions.end`` calls this)."""
        if self._launched is not None and self.state.live and self.kill_reason is None:
            self._launched.connection.send(EndSession(session))

    # --- heartbeats -------------------------------------------------------------

    def ping(self) -> None:
        if self._launched is None or self.kill_reason is not None:
            return
        self._ping_seq += 1
        if self._ping_sent_at is None:
            self._ping_sent_at = time.monotonic()
        self._launched.connection.send_control(Ping(self._ping_seq))

    def silent_for(self, now: float) -> float:
        """Seconds since the oldest unanswered ping (0 when all were answered)."""
        return 0.0 if self._ping_sent_at is None else now - self._ping_sent_at

    # --- WorkerEvents -----------------------------------------------------------

    def frame_received(self, message: Any) -> None:
        if type(message) is Result:  # the common case first, in as few steps as it takes
            pending = self._pending.get(message.id)
            if pending is not None and not pending.cancelling:
                future = pending.future
                timer = pending.deadline_timer
                if timer is not None:
                    timer.cancel()
                    if self._loop.time() >= timer.when():
                        # Read once the deadline had passed, before its timer ran: a
                        # timeout, whichever of the loop's callbacks happens to run first.
                        pending.finish(
                            CallTimeout(
                                f"call {pending.method!r} ran past its deadline",
                                **self._error_context(pending),
                            )
                        )
                if not future.done():
                    future.set_result(message.value)
                    if pending.stream_window:
                        pending.wake()
                del self._pending[message.id]
                self.calls_served += 1
                if not (self.reserved or self._pending or self.leased):
                    self._refresh_busy()
                self._on_capacity(self)
                return
        call_id = getattr(message, "id", None)
        if call_id is not None:
            pending = self._pending.get(call_id)
            if pending is None:
                if 0 < call_id < self._next_id and isinstance(message, CancelAck):
                    return  # late ack of a call already settled by its reply
                self._violation(f"reply for unknown or settled call id {call_id}")
                return
            if isinstance(message, Result):
                return  # a cancelled call's late result: its CancelAck settles it
            if isinstance(message, Chunk):
                if not pending.cancelling:
                    if not pending.stream_window:
                        self._violation(f"stream chunk for plain call {call_id}")
                        return
                    pending.push(message.value)
            elif isinstance(message, End):
                if not pending.cancelling:
                    pending.finish()
                    self._settle(pending)
            elif isinstance(message, Error):
                if not pending.cancelling:
                    pending.finish(self._remote_failure(pending, message))
                    self._settle(pending)
            elif isinstance(message, CancelAck):
                if pending.cancelling:
                    self._settle(pending)
                else:
                    self._violation(f"CancelAck for call {call_id}, which was not cancelled")
            return
        if isinstance(message, Pong):
            self.last_pong = time.monotonic()
            if message.seq == self._ping_seq:
                self._ping_sent_at = None
        elif isinstance(message, Hello):
            if self._hello.done():
                self._violation("second Hello")
            else:
                self._hello.set_result(message)
        else:
            self._violation(f"unexpected message {type(message).__name__}")

    def frames_done(self) -> None:
        return None

    def _remote_failure(self, pending: PendingCall, error: Error) -> CorralError:
        context = self._error_context(pending)
        kind = error.kind
        if kind == ErrorKind.METHOD_NOT_FOUND:
            return MethodNotFound(error.message, type=error.type, **context)
        if kind == ErrorKind.TOO_LARGE:
            return PayloadTooLarge(f"result of {pending.method!r}: {error.message}", **context)
        if kind == ErrorKind.TIMEOUT:
            return CallTimeout(f"call {pending.method!r} ran past its deadline", **context)
        return RemoteError(error.message, type=error.type, traceback=error.traceback, **context)

    def _violation(self, reason: str) -> None:
        self.connection_broken(ProtocolError(reason, worker_id=self.id, pid=self.pid))

    def connection_broken(self, error: ProtocolError | None) -> None:
        if isinstance(error, TruncatedStream | LostSegment) and not self._exited.is_set():
            # A stream cut inside a frame is what a worker killed mid-write leaves
            # too, and a result whose segment is gone is what a worker that died
            # right after sending it leaves (its shepherd unlinked the segment):
            # its exit status decides (a crash), unless it exits cleanly or
            # lingers, which makes it the protocol error it looks like.
            self._truncated = error
            self._loop.call_later(_EOF_EXIT_WAIT, self._eof_without_exit)
            return
        if error is not None:
            if error.worker_id is None:
                error.worker_id, error.pid = self.id, self.pid
            self._log.error("worker.protocol_error", error=error.message)
            self._fail_pending(
                lambda p: ProtocolError(
                    f"worker broke the protocol: {error.message}", **self._error_context(p)
                )
            )
            self.kill(f"protocol error: {error.message}")
        elif not self._exited.is_set():
            # The worker closed its end of the wire: it is on its way out. Its exit
            # status says why; evict it only if it lingers.
            self._loop.call_later(_EOF_EXIT_WAIT, self._eof_without_exit)

    def _eof_without_exit(self) -> None:
        if self._exited.is_set() or self.kill_reason is not None or self.closing:
            return
        if self._truncated is not None:
            self.connection_broken(ProtocolError(self._truncated.message))
        else:
            self.kill("the worker closed its protocol pipe but did not exit")

    def stderr_received(self, data: bytes) -> None:
        lines = (self._stderr_partial + data).split(b"\n")
        self._stderr_partial = lines.pop()[-_STDERR_LINE_MAX:]
        for raw in lines:
            line = raw[:_STDERR_LINE_MAX].decode(errors="replace").rstrip("\r")
            self._stderr_tail.append(line)
            self._log.info("worker.stderr", line=line)
        if lines and self._on_output is not None:
            self._on_output(self)

    def stderr_closed(self) -> None:
        if self._stderr_partial:
            self.stderr_received(b"\n")
        self._stderr_done.set()

    def process_exited(self, returncode: int) -> None:
        self.exit_code = returncode
        self._send = None
        self._finalizing = self._loop.create_task(self._finalize_exit())

    def process_lost(self, reason: str) -> None:
        """A remote worker can no longer be reached: no exit status will ever come."""
        self._lost_reason = reason
        if self.kill_reason is None and not self.closing:
            self.kill_reason = reason
        self._send = None
        self._finalizing = self._loop.create_task(self._finalize_exit())

    async def _wait_stderr_tail(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stderr_done.wait(), _EXIT_TAIL_WAIT)

    async def _finalize_exit(self) -> None:
        await self._wait_stderr_tail()
        was_ready = self.ready_at is not None
        self.state = WorkerState.DEAD
        how = describe_exit(self.exit_code)
        code = self.exit_code
        status = {"exit": how, "exit_code": code, "signal": _signal_name(code)}
        if self.closing:
            self._log.info("worker.exited", **status)
        else:
            self._log.warning(
                "worker.exited", reason=self.kill_reason, inflight=len(self._pending), **status
            )
        reason = self.kill_reason or f"the worker died ({how})"
        if (
            self.kill_reason is None
            and self.exit_code == -9
            and self.memory_limit
            and self.rss is not None
            and self.rss > 0.9 * self.memory_limit
        ):
            reason += f"; out of memory suspected (RSS was {self.rss // 2**20} MiB)"
        tail = self.stderr_tail

        def crashed(p: PendingCall) -> CorralError:
            context = self._error_context(p)
            if self._truncated is not None and self.exit_code == 0 and self.kill_reason is None:
                return ProtocolError(
                    f"worker broke the protocol: {self._truncated.message}",
                    exit_code=0,
                    stderr_tail=tail,
                    **context,
                )
            if self.closing and self.kill_reason is None:
                return PoolClosed(
                    f"the pool closed while {p.method!r} was in flight ({how})", **context
                )
            if p.session is not None:
                self.sessions_reported_lost.add(p.session)
            cls = SessionLost if p.session is not None else WorkerCrashed
            what = f"session {p.session!r} is lost: " if p.session is not None else ""
            return cls(
                f"{what}{reason} during {p.method!r}",
                exit_code=self.exit_code,
                stderr_tail=tail,
                **context,
            )

        if self.spec.shm_prefix:
            # Before any caller hears of the death: what the worker left is gone.
            unlink_segments(self.spec.shm_prefix)
        self._fail_pending(crashed)
        if self._launched is not None:
            self._launched.close()
        self._exited.set()
        if was_ready or self._hello.done():
            self._on_exit(self)

    def _fail_pending(self, make_error: Callable[[PendingCall], CorralError]) -> None:
        pendings = list(self._pending.values())
        self._pending.clear()
        self.unacked_cancels = 0
        for pending in pendings:
            for timer in (pending.deadline_timer, pending.grace_timer):
                if timer is not None:
                    timer.cancel()
            pending.finish(make_error(pending))
        if pendings:
            self._on_capacity(self)

    # --- stopping -----------------------------------------------------------------

    def kill(self, reason: str) -> None:
        """Evict now: SIGKILL the worker's process group. Pending calls fail on exit."""
        if self.kill_reason is None and not self.closing:
            self.kill_reason = reason
            self._log.warning("worker.evicted", reason=reason)
        self._send = None
        if self.state.live and self.state is not WorkerState.STOPPING:
            self._set_state(WorkerState.STOPPING)
        if self._launched is not None and not self._exited.is_set():
            self._launched.kill()
        self._on_capacity(self)

    def drain(self, reason: str) -> None:
        """Take no new calls; the supervisor stops the worker once its calls are done."""
        self.recycle_reason = reason
        self._set_state(WorkerState.DRAINING)
        self._log.info("worker.recycling", reason=reason, calls_served=self.calls_served)

    def sample_rss(self) -> int | None:
        """Read the worker's resident memory from /proc (Linux); None if unknown."""
        if self.pid is None or self._launched is None or not self._launched.same_host:
            return None  # a worker on another host: its pid means nothing here
        rss = rss_of(self.pid)
        if rss is not None:
            self.rss = rss
        return rss

    def forget_after_fork(self) -> None:
        if self._launched is not None:
            self._launched.forget_after_fork()

    def abandon(self) -> None:
        """Last resort when the pool is garbage: kill the group, await nothing."""
        launched = self._launched
        if launched is not None and not self._exited.is_set():
            launched.kill()

    async def wait_exited(self, timeout: float | None = None) -> bool:
        if self._exited.is_set():
            return True
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def shutdown(self, grace: float, kill_grace: float) -> None:
        """Stop gracefully, escalating: Shutdown frame, SIGTERM, SIGKILL. Bounded."""
        self.closing = True
        if self._launched is None:
            if self._finalizing is not None:  # a launch cut off midway: its exit is known
                await self._finalizing
            return
        if self._exited.is_set():
            return
        if self.state.live and self.state is not WorkerState.STOPPING:
            self._set_state(WorkerState.STOPPING)
        launched = self._launched
        launched.connection.send(Shutdown())
        if await self.wait_exited(grace):
            return
        self._log.warning("worker.terminating", after_seconds=grace)
        launched.terminate()
        if await self.wait_exited(kill_grace):
            return
        self._log.warning("worker.killing", after_seconds=kill_grace)
        launched.kill()
        if await self.wait_exited(2.0):
            return
        self._log.error("worker.shepherd_unresponsive")
        launched.force_kill()
        await self.wait_exited(2.0)

    def __repr__(self) -> str:
        return (
            f"<corral.WorkerHandle {self.id} pid={self.pid} {self.state.value} "
            f"inflight={self.inflight} sessions={len(self.sessions)}>"
        )
