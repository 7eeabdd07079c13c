"""The pool side of corral.tools: ``ToolPool`` and the ``ToolInstance`` it hands out.

A ToolPool runs a corral Pool of ``corral.tools._worker:app`` workers and one
session per instance; each session holds one running program. Users lease an
instance (``async with tools.instance() as repl``) and talk to it; sessions stay
out of sight unless wanted (``instance.session_id``, ``tools.pool``).

Owns: the options (validated at construction), starting every instance at
once, exclusive leases in FIFO order, turning tool-level failures into typed
errors, restarting a dead instance before it is handed out, and stopping every
program at close. Must not touch: the processes themselves (the worker does) or
corral's internals beyond the public Pool API.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal, Self

from .._door import check_seconds, check_timeout
from .._errors import PoolClosed, PoolTimeout, WorkerCrashed
from .._log import get_logger
from .._pool import Pool
from ._errors import ToolError, ToolExited, ToolStartError, ToolTimeout
from ._process import ToolSpec

__all__ = ["ReadResult", "ToolHealth", "ToolInstance", "ToolPool", "ToolStatus"]

WORKER_TARGET = "corral.tools._worker:app"
_INSTANCES_PER_WORKER = 8  # default: one worker process per 8 programs
_MARGIN = 5.0  # added to a read's own timeout for the call's deadline (the wire, the worker)
_pool_numbers = itertools.count(1)

Reason = Literal["marker", "quiet", "timeout", "exited"]


@dataclass(frozen=True)
class ReadResult:
    """What a read returned, and why it stopped.

    ``reason`` is ``"marker"`` (the marker or prompt was seen; it is not part of
    ``text``), ``"quiet"`` (no output for the quiet period), ``"timeout"`` or
    ``"exited"`` (the program ended; ``exit_code`` says how). ``text`` is all
    output read, whatever the reason.
    """

    text: str
    reason: Reason
    exit_code: int | None = None

    @property
    def matched(self) -> bool:
        """True if the marker (or the prompt) was seen."""
        return self.reason == "marker"

    @property
    def timed_out(self) -> bool:
        """True if the read ran to its timeout."""
        return self.reason == "timeout"

    @property
    def quiet(self) -> bool:
        """True if the read ended after a quiet period."""
        return self.reason == "quiet"

    @property
    def exited(self) -> bool:
        """True if the program ended."""
        return self.reason == "exited"


@dataclass(frozen=True)
class ToolStatus:
    """One instance as its worker sees it. ``bytes_in`` is input written to the program."""

    alive: bool
    pid: int | None
    uptime: float
    bytes_in: int
    bytes_out: int
    buffered: int  # output received and not read yet
    pending_input: int  # input queued and not yet taken by the program
    exit_code: int | None
    restarts: int
    command: list[str]
    session_id: str


@dataclass(frozen=True)
class ToolHealth:
    """``ok`` if alive and, for a tool with a prompt, an empty line brought it back."""

    ok: bool
    alive: bool
    latency: float | None
    detail: str


def _last_printed(text: str) -> str:
    """What a program showed last, for a timeout message: often a continuation
    prompt (sqlite3's ``...>``) saying it waits for the rest of the input."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    if not lines:
        return "the program printed nothing meanwhile"
    last = lines[-1]
    if len(last) > 80:
        last = "..." + last[-77:]
    return f"the program last printed {last!r} (waiting for more input?)"


class ToolInstance:
    """One running program of a ToolPool, reached through its corral session."""

    def __init__(self, tools: ToolPool, index: int) -> None:
        self._tools = tools
        self.index = index
        #: The corral session holding this program in its worker.
        self.session_id = f"{tools.name}-{index}"
        self.restarts = 0
        self._needs_restart = False

    @property
    def needs_restart(self) -> bool:
        """True once the program is known to have ended (or its worker died)."""
        return self._needs_restart

    async def _call(self, method: str, *args: Any, wait: float | None, **kwargs: Any) -> Any:
        """Call ``method`` in this instance's session; ``wait`` plus a margin is the deadline."""
        tools = self._tools
        pool = tools._open_pool()
        deadline = None if wait is None else wait + _MARGIN
        try:
            result = await pool.call(
                method, *args, session=self.session_id, timeout=deadline, **kwargs
            )
        except WorkerCrashed:
            self._needs_restart = True  # SessionLost included: the program went with it
            raise
        if isinstance(result, dict) and "error" in result:
            raise self._failure(result["error"])
        return result

    def _failure(self, error: Mapping[str, Any]) -> ToolError:
        kind = error.get("kind")
        context: dict[str, Any] = {
            "command": self._tools.command,
            "exit_code": error.get("exit_code"),
            "output_tail": error.get("output_tail") or None,
            "session": self.session_id,
        }
        if kind == "start":
            return ToolStartError(str(error.get("message")), **context)
        self._needs_restart = True
        return ToolExited(str(error.get("message")), **context)

    async def start(self) -> str:
        """Start (or start again) the program; returns its banner, the output before the prompt."""
        result = await self._call("tool.start", self._tools._spec, wait=self._tools.startup_timeout)
        self._needs_restart = False
        return str(result["banner"])

    async def restart(self) -> str:
        """Stop the program and start it afresh (its state is gone); returns the banner."""
        result = await self._call(
            "tool.restart", self._tools._spec, wait=self._tools.startup_timeout
        )
        self.restarts += 1
        self._needs_restart = False
        return str(result["banner"])

    async def _ensure_running(self) -> None:
        """At lease time: restart the program if it has ended (one round trip)."""
        result = await self._call("tool.lease", self._tools._spec, wait=self._tools.startup_timeout)
        if result["restarted"]:
            self.restarts += 1

    async def send(self, text: str, *, newline: bool = True) -> int:
        """Queue ``text`` (and a newline) for the program's input; returns at once.

        Returns the number of bytes queued. Raises ToolExited if the program ended.
        """
        data = text + "\n" if newline else text
        result = await self._call("tool.send", data, wait=self._tools.read_timeout)
        return int(result["queued"])

    async def read_until(
        self,
        marker: str | None = None,
        *,
        regex: bool = False,
        timeout: float | None = None,
        quiet: float | None = None,
    ) -> ReadResult:
        """Read output until ``marker`` (default: the prompt), a quiet period or ``timeout``.

        Never raises for a timeout or an ended program: the ReadResult says what
        happened and holds everything that arrived. ``quiet`` ends the read after
        that many seconds without output. With no prompt, no marker and no
        quiet period, it reads until the timeout or the end.
        """
        timeout = check_timeout(timeout) or self._tools.read_timeout
        quiet = check_timeout(quiet, "quiet")
        result = await self._call(
            "tool.read_until", marker, regex=regex, within=timeout, quiet=quiet, wait=timeout
        )
        outcome = ReadResult(str(result["text"]), result["reason"], result["exit_code"])
        if outcome.exited:
            self._needs_restart = True
        return outcome

    async def run(self, line: str, timeout: float | None = None) -> str:
        """Send ``line`` and return the output up to the next prompt (one round trip).

        Raises ToolTimeout (with ``.output``) if the prompt does not come in
        time, and ToolExited if the program ends. Needs a prompt.
        """
        tools = self._tools
        if tools.prompt is None:
            raise ValueError("run() needs a prompt: give ToolPool(prompt=...), or send/read_until")
        timeout = check_timeout(timeout) or tools.read_timeout
        result = await self._call("tool.run", line, within=timeout, wait=timeout)
        if result["reason"] == "timeout":
            raise ToolTimeout(
                f"no prompt {tools.prompt!r} within {timeout}s; {_last_printed(result['text'])}",
                output=str(result["text"]),
                command=tools.command,
                session=self.session_id,
            )
        return str(result["text"])

    async def interrupt(self) -> None:
        """Send SIGINT to the program, as Ctrl-C in a terminal would."""
        await self._call("tool.interrupt", wait=self._tools.read_timeout)

    async def status(self) -> ToolStatus:
        """Alive, pid, uptime, bytes in and out, unread output, exit code, restarts."""
        result = await self._call("tool.status", wait=self._tools.read_timeout)
        return ToolStatus(
            alive=result["alive"],
            pid=result["pid"],
            uptime=result["uptime"],
            bytes_in=result["bytes_in"],
            bytes_out=result["bytes_out"],
            buffered=result["buffered"],
            pending_input=result["pending_input"],
            exit_code=result["exit_code"],
            restarts=self.restarts,
            command=self._tools.command,
            session_id=self.session_id,
        )

    async def health(self, timeout: float = 5.0) -> ToolHealth:
        """Probe the program: alive, and (with a prompt) answering an empty line in time."""
        timeout = check_seconds(timeout, "timeout")
        try:
            result = await self._call("tool.health", within=timeout, wait=timeout)
        except WorkerCrashed as exc:
            return ToolHealth(False, False, None, f"worker died: {exc.message}")
        health = ToolHealth(result["ok"], result["alive"], result["latency"], result["detail"])
        if not health.alive:
            self._needs_restart = True
        return health

    async def stop(self) -> None:
        """Stop the program (input closed, then killed after ``kill_grace``)."""
        await self._call("tool.stop", wait=self._tools.kill_grace)
        self._needs_restart = True

    def __repr__(self) -> str:
        return f"<corral.tools.ToolInstance {self.index} session={self.session_id!r}>"


class _Lease:
    """``async with tools.instance() as inst``: one instance, exclusively."""

    def __init__(self, tools: ToolPool, timeout: float | None) -> None:
        self._tools = tools
        self._timeout = timeout
        self._instance: ToolInstance | None = None

    async def __aenter__(self) -> ToolInstance:
        self._instance = await self._tools._acquire(self._timeout)
        return self._instance

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            self._tools._release(instance)


class ToolPool:
    """A pool of one interactive program, started ``size`` times, each with its own state.

    Example::

        async with ToolPool("python3 -i -q", size=3, prompt=">>> ") as tools:
            async with tools.instance() as repl:
                await repl.run("1+1")  # "2\\n"

    ``command`` is a command line (split like a shell would, without running
    one) or an argv list. ``mode`` is ``"pty"`` (the program sees a terminal:
    prompts, line buffering; echo is off, ``TERM=dumb``, escape sequences are
    stripped from output) or ``"pipes"`` (stdin and one pipe for stdout and
    stderr together). ``prompt`` is the text the program shows when it waits
    for input (a regex with ``prompt_regex=True``); with it, an instance is
    ready once its first prompt shows, and ``run()`` works.

    Other options: ``env`` (added to the environment), ``cwd``,
    ``startup_timeout`` (for each program to show its prompt),
    ``read_timeout`` (default for reads), ``encoding``, ``strip_ansi`` (default:
    on for a pty), ``max_buffer`` (unread output kept before the program is
    made to wait), ``kill_grace`` (from closing a program's input to SIGKILL),
    ``workers`` (worker processes hosting the programs; default one per
    8 instances: a worker only moves bytes, and each one adds to start-up
    time), ``name``; anything else is passed to corral's Pool.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        size: int = 1,
        prompt: str | None = None,
        prompt_regex: bool = False,
        mode: Literal["pty", "pipes"] = "pty",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
        read_timeout: float = 30.0,
        encoding: str = "utf-8",
        strip_ansi: bool | None = None,
        max_buffer: int = 16 * 1024 * 1024,
        kill_grace: float = 1.0,
        workers: int | None = None,
        name: str | None = None,
        **pool_options: Any,
    ) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise ValueError(f"command must name a program, got {command!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if mode not in ("pty", "pipes"):
            raise ValueError(f"mode must be 'pty' or 'pipes', got {mode!r}")
        if prompt is not None and not prompt:
            raise ValueError("prompt must be non-empty text, or None for no prompt")
        startup_timeout = check_seconds(startup_timeout, "startup_timeout")
        read_timeout = check_seconds(read_timeout, "read_timeout")
        kill_grace = 0.0 if kill_grace == 0 else check_seconds(kill_grace, "kill_grace")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.command = argv
        self.size = size
        self.prompt = prompt
        self.mode = mode
        self.startup_timeout = startup_timeout
        self.read_timeout = read_timeout
        self.kill_grace = kill_grace
        self.workers = workers or -(-size // _INSTANCES_PER_WORKER)
        self.name = name or f"tools{next(_pool_numbers)}"
        spec = ToolSpec(
            argv=argv,
            mode=mode,
            env=dict(env or {}),
            cwd=os.fspath(cwd) if cwd is not None else None,
            prompt=prompt,
            prompt_regex=prompt_regex,
            encoding=encoding,
            startup_timeout=startup_timeout,
            max_buffer=max_buffer,
            strip_ansi=strip_ansi,
            kill_grace=kill_grace,
        )
        ToolSpec.from_dict(asdict(spec))  # the worker's checks, now rather than at start
        self._spec: dict[str, Any] = asdict(spec)
        per_worker = -(-size // self.workers)
        options = {"max_concurrency": max(16, 4 * per_worker), **pool_options}
        self._pool = Pool(WORKER_TARGET, size=self.workers, name=self.name, **options)
        self._instances = tuple(ToolInstance(self, i) for i in range(size))
        self._free: collections.deque[ToolInstance] = collections.deque(self._instances)
        self._waiters: collections.deque[asyncio.Future[ToolInstance]] = collections.deque()
        self._state = "new"  # new -> starting -> open -> closing -> closed
        self._log = get_logger("corral.tools").bind(tools=self.name)

    # --- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the workers, then every instance at once; ready when all show their prompt.

        Raises ToolStartError (command, exit code, output tail) if a program
        cannot start, and WorkerStartError if the workers cannot; everything
        started is stopped first.
        """
        if self._state != "new":
            raise PoolClosed(f"tool pool {self.name} was already started")
        self._state = "starting"
        try:
            await self._pool.start()
            outcomes = await asyncio.gather(
                *(i.start() for i in self._instances), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            self._state = "open"
            await self.aclose()
            raise
        self._state = "open"
        self._log.info("tools.started", command=self.command, size=self.size)

    async def aclose(self) -> None:
        """Stop every program, then the workers. Idempotent; no process is left behind."""
        if self._state in ("closing", "closed"):
            if self._state == "closing":
                await self._pool.aclose()
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        closed = PoolClosed(f"tool pool {self.name} is closing")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(closed)
        try:
            # Stopping each program ends any read still waiting on it.
            bound = self.kill_grace + _MARGIN
            await asyncio.gather(
                *(
                    self._pool.call("tool.stop", session=i.session_id, timeout=bound)
                    for i in self._instances
                ),
                return_exceptions=True,
            )
        finally:
            await self._pool.aclose()
            self._state = "closed"
            self._log.info("tools.closed")

    # --- instances ------------------------------------------------------------------

    @property
    def instances(self) -> tuple[ToolInstance, ...]:
        """Every instance, leased or not (direct use bypasses leases)."""
        return self._instances

    @property
    def pool(self) -> Pool:
        """The corral Pool whose workers host the programs."""
        return self._pool

    def instance(self, *, timeout: float | None = None) -> _Lease:
        """Lease one instance for an ``async with`` block; FIFO among waiters.

        ``timeout`` bounds the wait (PoolTimeout). An instance whose program is
        known to have ended is restarted before it is handed out.
        """
        return _Lease(self, check_timeout(timeout))

    async def run(self, line: str, timeout: float | None = None) -> str:
        """Run ``line`` on whichever instance is free first; see ToolInstance.run."""
        async with self.instance() as inst:
            return await inst.run(line, timeout)

    async def status(self) -> list[ToolStatus]:
        """The status of every instance, in order."""
        return list(await asyncio.gather(*(i.status() for i in self._instances)))

    def _open_pool(self, *, starting_ok: bool = True) -> Pool:
        if self._state != "open" and not (starting_ok and self._state == "starting"):
            raise PoolClosed(f"tool pool {self.name} is {self._state}")
        return self._pool

    async def _acquire(self, timeout: float | None) -> ToolInstance:
        self._open_pool(starting_ok=False)
        if self._free and not self._waiters:
            instance = self._free.popleft()
        else:
            waiter: asyncio.Future[ToolInstance] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    instance = await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release(waiter.result())  # granted as we gave up: pass it on
                else:
                    waiter.cancel()
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout(
                        f"no instance of tool pool {self.name} became free within {timeout}s"
                    ) from None
                raise
        try:
            if instance.needs_restart:
                await instance.restart()
            else:
                await instance._ensure_running()  # ended with no call since: nobody knew
        except BaseException:
            self._release(instance)
            raise
        return instance

    def _release(self, instance: ToolInstance) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._free.append(instance)

    def __repr__(self) -> str:
        leased = self.size - len(self._free)
        return (
            f"<corral.tools.ToolPool {shlex.join(self.command)!r} {self.size} instances "
            f"[{leased} leased | {len(self._waiters)} waiting] {self._state}>"
        )
