"""The template of a preloading pool: import heavy modules once, fork workers on request.

Run by the local launcher under a shepherd (like a worker) as
``python -c BOOTSTRAP --socket FD --preload MOD[,MOD...]`` with the workers'
environment and working directory. It imports corral's worker runtime and the
preload modules, refuses to go on if an import started a thread (forking a
threaded process can deadlock the child), says ``ready`` on the socket, then
waits. It never creates an event loop and never runs a user request.

A request is one datagram on the socket (a ``SOCK_SEQPACKET`` pair from the
pool): JSON naming the worker, plus six descriptors passed with SCM_RIGHTS: the
worker's calls, replies and control pipe ends, its lifeline, its stderr and a
status pipe. For each, the template forks a per-worker shepherd, which
- starts a session of its own (the template's shepherd never touches it);
- forks the worker, which leads its own process group, gets default signal
  handlers, keeps only stdio and its three protocol descriptors, and runs
  ``corral.worker.__main__.main``, exactly as a spawned worker would;
- then does what ``_shepherd.py`` does for a spawned worker (the same code,
  ``_shepherd.supervise``): kills the worker's group on lifeline EOF, forwards
  SIGTERM and turns SIGUSR1 into SIGKILL for the group, and when the worker ends
  kills what is left of its group before reaping it;
- reports on the status pipe, as lines: ``started SHEPHERD_PID WORKER_PID``, then
  ``exit CODE`` (negative for a signal), the worker's real exit status.

So a worker forked here owes nothing to the template once it runs: the template
may die (or be restarted) and the worker keeps serving and still reports its
exit. The template only reaps the shepherds it forked.

Owns: the preload imports and the two forks. Must not touch: the protocol
(it never reads or writes a frame) or anything of the pool's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any, NoReturn

from .. import _shepherd
from . import _lean

__all__ = ["REQUEST_FDS", "main"]

#: Descriptors sent with each request: calls, replies, control, lifeline, stderr, status.
REQUEST_FDS = 6
MAX_MESSAGE = 65536
_TAIL = 8000
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the pool is gone: nobody to tell
        sock.send(json.dumps(message).encode())


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):  # the pool closed its end: nobody to tell
        os.write(fd, f"{line}\n".encode())


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:  # closerange(n, n) would close everything from n on (close_range)
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _preload(sock: socket.socket, modules: list[str]) -> None:
    """Import corral's worker runtime and the preload modules; exit 3 on failure."""
    _lean.import_msgspec()  # as a spawned worker does (docs/decisions/0029-idle-worker-memory.md)
    importlib.import_module("corral.worker.__main__")
    importlib.import_module("corral.worker._main_thread")
    importlib.import_module("corral.worker._runtime")  # sync_mode="thread" apps
    importlib.import_module("concurrent.futures.thread")  # the sync lane's, imported lazily
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - any import-time failure, shown to the pool
            text = traceback.format_exc()
            sys.stderr.write(f"corral template: cannot import preload module {name!r}\n{text}")
            sys.stderr.flush()
            _send(
                sock,
                {
                    "error": f"preload module {name!r} failed to import: "
                    f"{type(exc).__name__}: {exc}",
                    "traceback": text[-_TAIL:],
                },
            )
            os._exit(3)
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        _send(
            sock,
            {
                "error": f"preloading {', '.join(modules)} started threads ({', '.join(threads)}); "
                "a process with threads cannot be forked safely. Import that module in the "
                "worker instead (not in preload), or make it start its threads later.",
                "traceback": "",
            },
        )
        os._exit(3)
    native = _native_threads()
    if native > 1:
        sys.stderr.write(
            f"corral template: {native - 1} native thread(s) running after the preload "
            "imports (a C library started them); forked workers do not inherit them\n"
        )


def _run_worker(request: dict[str, Any], calls: int, replies: int, control: int) -> NoReturn:
    """In the forked worker: become a worker exactly as a spawned one would."""
    code = 1
    try:
        os.setpgid(0, 0)
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _close_all_but({0, 1, 2, calls, replies, control})
        argv = ["--fds", f"{calls},{replies},{control}", *map(str, request["args"])]
        sys.argv = ["-c", *argv]
        from .__main__ import main as worker_main

        worker_main(argv)  # ends with os._exit
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown on the worker's stderr, then exit 1
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_shepherd(request: dict[str, Any], fds: list[int], sock: socket.socket) -> NoReturn:
    """In the forked shepherd: start the worker, watch it, report its pid and exit."""
    calls, replies, control, lifeline, stderr, status = fds
    try:
        sock.detach()  # its number is closed below; the object must never close it again
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(stderr, 1)
        os.dup2(stderr, 2)
        _close_all_but({0, 1, 2, calls, replies, control, lifeline, status})
        worker_pid = 0

        def forward(sig: int, _frame: object) -> None:
            if worker_pid:
                _shepherd._kill_group(worker_pid, signal.SIGKILL if sig == signal.SIGUSR1 else sig)

        for sig in _FORWARDED:
            signal.signal(sig, forward)
        try:
            worker_pid = os.fork()
        except OSError as exc:
            _report(status, f"error cannot fork the worker: {exc}")
            os._exit(1)
        if worker_pid == 0:
            os.close(lifeline)
            os.close(status)
            _run_worker(request, calls, replies, control)
        with contextlib.suppress(OSError):  # the worker may have done it already
            os.setpgid(worker_pid, worker_pid)
        for fd in (calls, replies, control):
            os.close(fd)
        _report(status, f"started {os.getpid()} {worker_pid}")
        prefix = str(request.get("unlink_prefix") or "")
        wait_status = _shepherd.supervise(worker_pid, lifeline, [prefix] if prefix else [])
        code = -signal.SIGKILL if wait_status is None else os.waitstatus_to_exitcode(wait_status)
        _report(status, f"exit {code}")
    except BaseException:  # noqa: BLE001 - shown on the worker's stderr; the pool sees EOF
        traceback.print_exc()
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
    finally:
        os._exit(0)


def _fork_worker(data: bytes, fds: list[int], sock: socket.socket) -> int | None:
    """Fork one worker's shepherd for a request; returns its pid (None if it failed)."""
    if len(fds) != REQUEST_FDS:
        sys.stderr.write(f"corral template: a request came with {len(fds)} descriptors\n")
        for fd in fds:
            os.close(fd)
        return None
    status = fds[5]
    try:
        request = json.loads(data)
        if (
            not isinstance(request, dict)
            or not {"worker_id", "target", "args"} <= request.keys()
            or not isinstance(request["args"], list)
        ):
            raise ValueError(f"not a worker request: {data[:200]!r}")
    except ValueError as exc:
        _report(status, f"error bad request: {exc}")
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        _report(status, f"error cannot fork: {exc}")
        pid = None
    if pid == 0:
        _run_shepherd(request, fds, sock)
    for fd in fds:
        os.close(fd)
    return pid


def _serve(sock: socket.socket) -> NoReturn:
    """Fork a worker per request; reap the shepherds; exit when the pool hangs up."""
    watched: dict[int, int] = {}  # pidfd -> shepherd pid
    unwatched: set[int] = set()  # shepherds without a pidfd: polled
    listening = sock.fileno()
    while True:
        try:
            ready, _, _ = select.select([listening, *watched], [], [], 0.5 if unwatched else None)
        except InterruptedError:
            continue
        for fd in ready:
            if fd in watched:
                pid = watched.pop(fd)
                os.close(fd)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        for pid in list(unwatched):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            unwatched.discard(pid)
        if listening not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, REQUEST_FDS)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)  # the pool closed its end, or died: no more workers from here
        shepherd = _fork_worker(data, fds, sock)
        if shepherd is None:
            continue
        try:
            watched[os.pidfd_open(shepherd)] = shepherd
        except (AttributeError, OSError):
            unwatched.add(shepherd)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the template: preload, say ready, fork workers until the pool hangs up."""
    parser = argparse.ArgumentParser(prog="corral template")
    parser.add_argument("--socket", type=int, required=True)
    parser.add_argument("--preload", default="")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket)
    sock.set_inheritable(False)
    sock.setblocking(True)
    os.dup2(2, 1)  # stray prints go to the template's stderr, like a worker's
    _preload(sock, [m for m in args.preload.split(",") if m])
    # Move everything imported so far out of the collector's reach: a collection
    # in a worker then does not write to (and so copy) the pages it shares with us.
    gc.collect()
    gc.freeze()
    _lean.trim_heap()  # what the imports freed goes back to the system, not into every fork
    _send(sock, {"ready": os.getpid()})
    _serve(sock)


if __name__ == "__main__":
    main()
