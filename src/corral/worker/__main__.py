"""Entry point of a worker process: ``python -m corral.worker MODULE:ATTR``.

Owns: the process-level set-up before any user code runs: the protocol
descriptors (private, never inherited by the worker's own children), fd 1
pointed at stderr so ``print()`` never reaches the wire, death with the parent,
the parent's ``sys.path``, then importing the target and serving it. Must not
touch: what happens per call (``_runtime``).

What it imports at start is what an idle worker keeps (docs/performance.md):
msgspec comes in through ``_lean.import_msgspec`` before anything else of
corral's wire, and the C heap is trimmed once the target is loaded.

Exit codes: 0 clean shutdown, 2 bad command line, 3 the target cannot be
imported or is not an App, 4 an ``on_startup`` hook failed, 5 an
``on_shutdown`` hook failed.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from . import _lean
from ._app import App

if TYPE_CHECKING:
    import argparse

SYS_PATH_ENV = "CORRAL_SYS_PATH"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Backup for the shepherd: the kernel kills us if our parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def _isolate_stdout(protocol_fds: tuple[int, ...]) -> None:
    """Point fd 1 at stderr so nothing written to stdout can corrupt the wire."""
    for fd in protocol_fds:
        os.set_inheritable(fd, False)
    if 1 not in protocol_fds:
        os.dup2(2, 1)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def load_target(spec: str) -> App:
    """Import ``MODULE:ATTR`` and return the App it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like 'package.module:app', got {spec!r}")
    target: object = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if callable(target) and not isinstance(target, App):
        _check_factory(spec, target)
        target = target()  # a factory
    if not isinstance(target, App):
        raise TypeError(f"{spec!r} is {type(target).__qualname__}, not a corral.worker.App")
    return target


def _check_factory(spec: str, target: object) -> None:
    """Refuse, in the words the pool uses, a function that cannot be the App's factory."""
    import inspect  # only for a factory target: an App target never loads it

    if inspect.iscoroutinefunction(target):
        raise TypeError(f"`{spec}` is a coroutine function, not a corral.worker.App")
    if inspect.isfunction(target):
        try:
            inspect.signature(target).bind()
        except TypeError:
            raise TypeError(
                f"`{spec}` is a function, not a corral.worker.App; name the App (or a "
                "factory that takes no arguments and returns one)"
            ) from None


def _parser() -> argparse.ArgumentParser:
    import argparse

    from .._framing import DEFAULT_MAX_MESSAGE_SIZE

    parser = argparse.ArgumentParser(prog="python -m corral.worker")
    parser.add_argument("target", help="MODULE:ATTR naming a corral.worker.App")
    parser.add_argument("--fds", default="0,1", help="READ,WRITE[,CONTROL] protocol descriptors")
    parser.add_argument("--worker-id", default=f"w{os.getpid()}")
    parser.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE)
    parser.add_argument("--large-buffer-threshold", type=int, default=0)
    parser.add_argument("--shm-prefix", default="")
    parser.add_argument("--stream-threshold", type=int, default=0)
    parser.add_argument("--compression", default=None)
    parser.add_argument("--large-bytes", choices=("bytes", "memoryview"), default="bytes")
    return parser


_OPTIONS = {
    "--fds": str,
    "--worker-id": str,
    "--max-message-size": int,
    "--large-buffer-threshold": int,
    "--shm-prefix": str,
    "--stream-threshold": int,
    "--compression": str,
    "--large-bytes": str,
}


def _parse_args(argv: list[str]) -> argparse.Namespace | SimpleNamespace:
    """The command line as the launchers write it (``--option value`` pairs and a
    target), read without argparse, which imports 2 MiB (shutil, gettext) into
    every worker; anything else (``--help``, a mistake) goes to argparse."""
    from .._framing import DEFAULT_MAX_MESSAGE_SIZE

    values: dict[str, Any] = {
        "target": None,
        "fds": "0,1",
        "worker_id": f"w{os.getpid()}",
        "max_message_size": DEFAULT_MAX_MESSAGE_SIZE,
        "large_buffer_threshold": 0,
        "shm_prefix": "",
        "stream_threshold": 0,
        "compression": None,
        "large_bytes": "bytes",
    }
    rest = list(argv)
    try:
        while rest:
            word = rest.pop(0)
            option, equals, value = word.partition("=")
            kind = _OPTIONS.get(option)
            if kind is not None:
                values[option[2:].replace("-", "_")] = kind(value if equals else rest.pop(0))
            elif values["target"] is None and not word.startswith("-"):
                values["target"] = word
            else:
                raise ValueError(word)
    except (ValueError, IndexError):
        return _parser().parse_args(argv)  # exits with argparse's message
    if values["target"] is None:
        return _parser().parse_args(argv)
    return SimpleNamespace(**values)


def main(argv: list[str] | None = None) -> None:
    _lean.import_msgspec()  # first: before corral's wire modules import it
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    fds = [int(x) for x in args.fds.split(",")]
    read_fd, write_fd = fds[0], fds[1]
    control_fd = fds[2] if len(fds) > 2 else None

    parent_path = os.environ.pop(SYS_PATH_ENV, None)
    if parent_path is not None:
        sys.path[:] = json.loads(parent_path)
    if (read_fd, write_fd) != (0, 1):
        _isolate_stdout(tuple(fds))
    else:  # stdin/stdout as the wire (run by hand): keep the wire, move stdout
        write_fd = os.dup(1)
        read_fd = os.dup(0)
        _isolate_stdout((read_fd, write_fd))
    _die_with_parent()

    try:
        app = load_target(args.target)
    except BaseException:  # noqa: BLE001 - any import-time failure, shown to the pool
        import traceback

        sys.stderr.write(f"corral worker: cannot load {args.target!r}\n")
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)

    from .._shm import LargeBuffers

    large = None
    if args.large_buffer_threshold > 0:
        large = LargeBuffers(
            args.shm_prefix,
            args.large_buffer_threshold,
            "w",
            views=args.large_bytes == "memoryview",
        )
    stream = None
    if args.stream_threshold > 0:  # a socket to the pool: buffers follow their frames
        stream = (args.stream_threshold, args.compression)
    _lean.trim_heap()  # what start-up freed goes back to the system, not kept idle
    if app.sync_mode == "thread":  # sync handlers on a thread of their own: the loop reads
        import asyncio

        from ._runtime import serve as serve_on_loop

        code = asyncio.run(
            serve_on_loop(
                app,
                args.worker_id,
                read_fd,
                write_fd,
                args.max_message_size,
                control_fd,
                large,
                stream,
            )
        )
    else:  # the main thread reads and runs sync handlers; async code gets a loop thread
        from ._main_thread import serve

        code = serve(
            app,
            args.worker_id,
            read_fd,
            write_fd,
            args.max_message_size,
            control_fd,
            large,
            stream,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
