"""One interactive program run by a worker: its process, its input and its output.

Owns: starting the program on a pty or on pipes, writing its input without
blocking, buffering its output (with back-pressure past ``max_buffer``),
reading until a marker, a quiet period or a deadline, its status, and its end.
The program stays in the worker's process group and gets a parent-death signal,
so it never outlives the worker.

Must not touch: corral's wire, sessions or handlers (``_worker`` maps calls onto
this), nor any process but its own child.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import errno
import functools
import os
import re
import signal
import sys
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ReadOutcome", "ToolProcess", "ToolSpec", "ToolStartFailed", "strip_ansi"]

_PR_SET_PDEATHSIG = 1
_READ_SIZE = 65536
_TAIL = 2000
_EOF_GRACE = 0.2  # after the process exits, how long its output may still trail in
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_libc: Any = None


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences (colours, cursor moves, titles) from text."""
    return _ANSI.sub("", text)


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """How to start one program. Plain data, sent by the pool at ``tool.start``."""

    argv: Sequence[str]
    mode: str = "pty"  # or "pipes"
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    prompt: str | None = None
    prompt_regex: bool = False
    encoding: str = "utf-8"
    startup_timeout: float = 10.0
    max_buffer: int = 16 * 1024 * 1024
    strip_ansi: bool | None = None  # None: on for a pty, off for pipes
    kill_grace: float = 1.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolSpec:
        """Build from the dict the pool sends; unknown keys are an error."""
        spec = cls(**data)
        if not spec.argv or not all(isinstance(a, str) for a in spec.argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {spec.argv!r}")
        if spec.mode not in ("pty", "pipes"):
            raise ValueError(f"mode must be 'pty' or 'pipes', got {spec.mode!r}")
        codecs.lookup(spec.encoding)  # LookupError for an unknown encoding
        return spec

    def marker(
        self, text: str | None = None, regex: bool | None = None
    ) -> re.Pattern[bytes] | None:
        """The byte pattern for a marker (default: the prompt), or None."""
        if text is None:
            text, regex = self.prompt, self.prompt_regex
        if text is None:
            return None
        raw = text.encode(self.encoding)
        return re.compile(raw if regex else re.escape(raw))


@dataclass(frozen=True)
class ReadOutcome:
    """What one read returned: the text and why it stopped."""

    text: str
    reason: str  # "marker", "quiet", "timeout" or "exited"
    exit_code: int | None

    def as_dict(self) -> dict[str, Any]:
        """As the worker returns it over the wire."""
        return {"text": self.text, "reason": self.reason, "exit_code": self.exit_code}


class ToolStartFailed(Exception):
    """The program did not start, or ended or stayed silent before its prompt."""

    def __init__(self, message: str, *, exit_code: int | None, output_tail: str) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.output_tail = output_tail


def _child_setup(parent_pid: int) -> None:
    """Runs in the child between fork and exec: die with the worker."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        os._exit(1)


def _load_libc() -> None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(None, use_errno=True)


def _quiet_terminal(fd: int) -> None:
    """No echo of input, and no CR added before LF in output."""
    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.ONLCR  # oflag
    attrs[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class ToolProcess:
    """A running program: non-blocking input, buffered output, status."""

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.started_at = 0.0  # time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self._loop = asyncio.get_running_loop()
        self._proc: asyncio.subprocess.Process | None = None
        self._read_fd = -1
        self._write_fd = -1
        self._buf = bytearray()
        self._tail = bytearray()  # the last output, kept for error messages
        self._eof = False
        self._reading = False
        self._pending_input = bytearray()
        self._writing = False
        self._changed = asyncio.Event()
        self._last_output = 0.0
        self._read_lock = asyncio.Lock()
        self._decoder = codecs.getincrementaldecoder(spec.encoding)(errors="replace")
        self._waiter: asyncio.Task[None] | None = None
        self._strip = spec.strip_ansi if spec.strip_ansi is not None else spec.mode == "pty"

    # --- start ----------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.spec.mode == "pty":
            # A plain terminal: no colours or line-editing tricks unless asked for.
            env["TERM"] = "dumb"
            env["PYTHON_BASIC_REPL"] = "1"
        env.update(self.spec.env)
        return env

    async def start(self) -> str:
        """Start the program; with a prompt, wait for it. Returns the output before it.

        Raises ToolStartFailed with the exit code and the output's tail.
        """
        _load_libc()
        spec = self.spec
        if spec.mode == "pty":
            master, slave = os.openpty()
            _quiet_terminal(slave)
            child_fds = (slave, slave, slave)
            ours = (master, master)
            to_close: tuple[int, ...] = (slave,)
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            child_fds = (in_r, out_w, out_w)
            ours = (out_r, in_w)
            to_close = (in_r, out_w)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=child_fds[0],
                stdout=child_fds[1],
                stderr=child_fds[2],
                env=self._environment(),
                cwd=spec.cwd,
                close_fds=True,
                preexec_fn=functools.partial(_child_setup, os.getpid()),
            )
        except OSError as exc:
            for fd in (*to_close, *set(ours)):
                os.close(fd)
            raise ToolStartFailed(
                f"cannot start {spec.argv[0]!r}: {exc.strerror or exc}",
                exit_code=None,
                output_tail="",
            ) from exc
        for fd in to_close:
            os.close(fd)
        self.pid = self._proc.pid
        self.started_at = time.monotonic()
        self._last_output = self.started_at
        self._read_fd, self._write_fd = ours
        os.set_blocking(self._read_fd, False)
        if self._write_fd != self._read_fd:
            os.set_blocking(self._write_fd, False)
        self._resume_reading()
        self._waiter = self._loop.create_task(self._wait_exit())
        if spec.prompt is None:
            return ""
        outcome = await self.read_until(spec.marker(), timeout=spec.startup_timeout)
        if outcome.reason == "marker":
            return outcome.text
        tail = self.output_tail()
        if outcome.reason == "exited":
            message = f"{spec.argv[0]!r} ended before showing its prompt {spec.prompt!r}"
        else:
            message = (
                f"{spec.argv[0]!r} did not show its prompt {spec.prompt!r} within "
                f"{spec.startup_timeout}s"
            )
        await self.stop(0.0)
        raise ToolStartFailed(message, exit_code=self.exit_code, output_tail=tail)

    async def _wait_exit(self) -> None:
        assert self._proc is not None
        self.exit_code = await self._proc.wait()
        self._changed.set()
        if not self._eof:
            # A grandchild may hold the output open: give trailing output a moment.
            self._loop.call_later(_EOF_GRACE, self._end_of_output)

    # --- output ---------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self._reading and not self._eof:
            self._loop.add_reader(self._read_fd, self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._read_fd)
            self._reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self._read_fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:  # EIO on a pty: every holder of its other end has closed it
            data = b""
        if not data:
            self._end_of_output()
            return
        self.bytes_out += len(data)
        self._buf += data
        self._tail += data
        if len(self._tail) > 2 * _TAIL:
            del self._tail[:-_TAIL]
        self._last_output = time.monotonic()
        self._changed.set()
        if len(self._buf) >= self.spec.max_buffer:
            self._pause_reading()  # back-pressure: the program blocks on its writes

    def _end_of_output(self) -> None:
        if self._eof:
            return
        self._pause_reading()
        self._eof = True
        self._changed.set()

    def output_tail(self) -> str:
        """The last output of the program (read or not), decoded, for error messages."""
        text = bytes(self._tail[-_TAIL:]).decode(self.spec.encoding, errors="replace")
        return strip_ansi(text) if self._strip else text

    def _take(self, end: int, skip: int = 0) -> str:
        """Consume ``end + skip`` bytes of output; return the first ``end`` as text."""
        data = bytes(self._buf[:end])
        del self._buf[: end + skip]
        self._resume_reading()
        text = self._decoder.decode(data)
        return strip_ansi(text) if self._strip else text

    async def read_until(
        self,
        marker: re.Pattern[bytes] | None,
        *,
        timeout: float,
        quiet: float | None = None,
    ) -> ReadOutcome:
        """Read until ``marker``, ``quiet`` seconds without output, ``timeout``, or the end.

        The marker (default: none) is consumed and not returned. Quiet time counts
        from the last output or from the start of this read, whichever is later.
        Whatever the reason, the output read so far is returned, never lost.
        """
        async with self._read_lock:
            start = time.monotonic()
            deadline = start + timeout
            scanned = 0
            while True:
                if marker is not None:
                    found = marker.search(self._buf, scanned)
                    if found is not None:
                        return ReadOutcome(
                            self._take(found.start(), found.end() - found.start()),
                            "marker",
                            None,
                        )
                    # A match can only end in bytes not seen yet; re-scan a margin.
                    scanned = max(0, len(self._buf) - 256)
                if self._eof and self.exit_code is not None:
                    return ReadOutcome(self._take(len(self._buf)), "exited", self.exit_code)
                now = time.monotonic()
                if now >= deadline:
                    return ReadOutcome(self._take(len(self._buf)), "timeout", None)
                wake = deadline
                if quiet is not None:
                    quiet_end = max(start, self._last_output) + quiet
                    if now >= quiet_end:
                        return ReadOutcome(self._take(len(self._buf)), "quiet", None)
                    wake = min(wake, quiet_end)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wake - now)

    # --- input ----------------------------------------------------------------

    @property
    def reading(self) -> bool:
        """True while a read is waiting for output."""
        return self._read_lock.locked()

    @property
    def alive(self) -> bool:
        """True while the program runs."""
        return self._proc is not None and self.exit_code is None

    def has_ended(self) -> bool:
        """Ask the kernel whether the program has ended, without reaping it.

        True as soon as the process is gone, even before the event loop's child
        watcher has noticed (``alive`` follows the watcher). One ``waitid`` call.
        """
        proc = self._proc
        if proc is None or self.exit_code is not None or proc.returncode is not None:
            return True
        try:
            ended = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped by the watcher
        return ended is not None

    def write(self, data: bytes) -> int:
        """Queue input for the program; never blocks. Returns the bytes queued.

        Raises BrokenPipeError once the program has ended or closed its input.
        """
        if not self.alive or self._write_fd < 0:
            raise BrokenPipeError(errno.EPIPE, "the program is not running")
        self._pending_input += data
        self._flush_input()
        return len(data)

    def _flush_input(self) -> None:
        while self._pending_input:
            try:
                n = os.write(self._write_fd, self._pending_input)
            except BlockingIOError:
                break
            except OSError:  # EPIPE, EIO: the program is gone; its exit is reported
                self._pending_input.clear()
                break
            self.bytes_in += n
            del self._pending_input[:n]
        if self._pending_input and not self._writing:
            self._loop.add_writer(self._write_fd, self._flush_input)
            self._writing = True
        elif not self._pending_input and self._writing:
            self._loop.remove_writer(self._write_fd)
            self._writing = False

    def interrupt(self) -> None:
        """Send SIGINT to the program (what Ctrl-C does in a terminal)."""
        if self.alive and self.pid is not None:
            os.kill(self.pid, signal.SIGINT)

    # --- status and end -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Alive, pid, uptime, bytes in and out, output not yet read, exit code."""
        return {
            "alive": self.alive,
            "pid": self.pid,
            "uptime": time.monotonic() - self.started_at if self.started_at else 0.0,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "buffered": len(self._buf),
            "pending_input": len(self._pending_input),
            "exit_code": self.exit_code,
        }

    async def stop(self, grace: float | None = None) -> int | None:
        """End the program: close its input, wait ``grace``, then SIGKILL. Idempotent.

        Returns its exit code (negative for a signal).
        """
        grace = self.spec.kill_grace if grace is None else grace
        proc = self._proc
        self._close_input()
        if proc is not None and self.exit_code is None:
            if grace > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self.exit_code = await proc.wait()
        if self._waiter is not None:
            await self._waiter
        self._close_output()
        return self.exit_code

    def kill_now(self) -> None:
        """SIGKILL the program and let go of its descriptors; no waiting (reaped later)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._close_input()
        self._close_output()

    def _close_input(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._write_fd)
            self._writing = False
        self._pending_input.clear()
        if self._write_fd >= 0 and self._write_fd != self._read_fd:
            os.close(self._write_fd)
        elif self._write_fd >= 0:  # a pty: one descriptor both ways; EOF to the program
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b"\x04")
        self._write_fd = -1

    def _close_output(self) -> None:
        self._pause_reading()
        self._eof = True
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        self._changed.set()
