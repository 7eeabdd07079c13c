"""The shepherd: a tiny process that starts one worker and makes sure it dies.

Run as ``python -I -S _shepherd.py LIFELINE_FD [--unlink-prefix=P] -- WORKER_ARGV...``
by the local launcher, as the leader of a new session. It imports nothing from corral and
runs no user code, so it always answers, even when the worker's main thread is
stuck in C code holding the GIL.

Owns: the worker's process group and its end. It
- starts the worker in a process group of its own (fd 1 pointed at fd 2);
- on lifeline EOF (the pool's process died: the kernel closed its end) kills the
  worker's whole group with SIGKILL;
- on SIGTERM forwards SIGTERM to the group; on SIGUSR1 kills the group;
- when the worker ends, kills what is left of the group (grandchildren) before
  reaping the worker, so the group id cannot be reused under it;
- once the group is gone, unlinks the worker's large-buffer segments left in
  /dev/shm (names starting with the ``--unlink-prefix``), so neither a crash
  nor the death of the pool's process leaks shared memory;
- then ends the same way the worker did (same exit code, or same signal), so the
  pool reads the worker's exit status from its own child.

Must not touch: the protocol descriptors (it passes them on and closes its own
copies) or anything else of corral's; it must stay importable with ``-I -S``.
"""

import os
import select
import signal
import sys


def _kill_group(pgid: int, sig: int) -> None:
    try:  # noqa: SIM105 - contextlib would pull collections, functools into the shepherd
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _unlink_segments(prefix: str) -> None:
    """Unlink /dev/shm/PREFIX*: what the dead worker (or a dead pool) left behind."""
    # The launcher passes "corral-<pid>-<random>-<n>-": never a bare or odd prefix.
    if not prefix.startswith("corral-") or "/" in prefix or len(prefix) < 12:
        return
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:  # noqa: SIM105 - contextlib would pull more imports into the shepherd
                os.unlink("/dev/shm/" + name)
            except OSError:
                pass


def _mirror(status: int) -> None:
    """End this process the way the worker ended."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, OSError, ValueError):
            pass
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            except (OSError, ValueError):
                pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default action is not to terminate
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main(argv: list[str]) -> None:
    separator = argv.index("--") if "--" in argv else -1
    options = argv[2:separator] if separator > 1 else []
    unknown = [o for o in options if not o.startswith("--unlink-prefix=")]
    if separator < 2 or separator == len(argv) - 1 or unknown:
        sys.stderr.write("usage: _shepherd.py LIFELINE_FD [--unlink-prefix=P] -- WORKER_ARGV...\n")
        os._exit(2)
    lifeline = int(argv[1])
    command = argv[separator + 1 :]
    prefixes = [o.partition("=")[2] for o in options]
    os.set_inheritable(lifeline, False)

    worker_pid = 0

    def forward(sig: int, _frame: object) -> None:
        if worker_pid:
            _kill_group(worker_pid, signal.SIGKILL if sig == signal.SIGUSR1 else sig)

    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    for sig in handled:
        signal.signal(sig, forward)
    try:
        worker_pid = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, 2, 1)],
            setpgroup=0,
            setsigdef=handled,
        )
    except OSError as exc:
        sys.stderr.write(f"corral shepherd: cannot start worker {command[0]!r}: {exc}\n")
        os._exit(127)
    # The worker has its own copies of the protocol pipes; dropping ours means the
    # pool sees the wire close as soon as the worker closes it or dies.
    os.closerange(3, lifeline)
    os.closerange(lifeline + 1, 65536)

    status = supervise(worker_pid, lifeline, prefixes)
    if status is None:
        os._exit(0)
    _mirror(status)


def supervise(worker_pid: int, lifeline: int, unlink_prefixes: list[str]) -> int | None:
    """Wait for the worker to end or the lifeline to close; clear its group; reap it.

    Then unlinks the worker's large-buffer segments (``unlink_prefixes``).
    Returns the worker's wait status (None if it was reaped elsewhere). Also run
    by the per-worker shepherd of a worker forked from a template
    (``corral.worker._template``).
    """
    try:
        watch = os.pidfd_open(worker_pid)
    except (AttributeError, OSError):
        watch = -1

    while True:
        ready: list[int] = []
        try:
            waiting = [lifeline] if watch < 0 else [lifeline, watch]
            ready, _, _ = select.select(waiting, [], [], 0.05 if watch < 0 else None)
        except InterruptedError:
            continue
        if lifeline in ready:
            # The pool is gone: nothing may outlive it.
            _kill_group(worker_pid, signal.SIGKILL)
            break
        if watch < 0:
            try:
                info = os.waitid(os.P_PID, worker_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is not None:
                break
        elif watch in ready:
            break
    if watch >= 0:
        os.close(watch)
    # The worker has ended (a zombie still owns its pid and group id) or is being
    # killed: clear out its group, then reap it.
    _kill_group(worker_pid, signal.SIGKILL)
    status: int | None = None
    while True:
        try:
            _, status = os.waitpid(worker_pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    for prefix in unlink_prefixes:
        _unlink_segments(prefix)
    return status


if __name__ == "__main__":
    main(sys.argv)
