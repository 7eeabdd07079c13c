"""The ``corral`` command line: ``demo``, ``call``, ``top``, ``bench``, ``version``.

Owns: argument parsing and the logging set-up of the command-line program (an
application, so it may configure structlog; the library never does). Must not
touch: pool internals. ``top`` and ``bench`` (``_top``, ``_bench``) load rich,
imported only when those commands run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import structlog

from . import __version__
from ._install import install_command


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported on one line (and exit code 2, as argparse does)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="corral", description="asyncio-native process pools")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a pool of the bundled worker under a mixed load")
    demo.add_argument("--size", type=_workers, default=2, help="workers in the pool (default 2)")
    demo.add_argument("-v", "--verbose", action="store_true", help="show the pool's log events")
    call = commands.add_parser(
        "call", help="start one worker of TARGET, call METHOD once, print the result as JSON"
    )
    call.add_argument("target", type=_target, help="MODULE:ATTR naming a corral.worker.App")
    call.add_argument("method", help="the handler to call")
    call.add_argument(
        "args",
        nargs="*",
        default=[],
        type=_parse_argument,
        help="arguments: each parsed as JSON if it is JSON (1, 2.5, true, null, "
        "'\"text\"', '[1, 2]', '{\"a\": 1}'), else taken as a string",
    )
    call.add_argument(
        "--timeout", type=_positive, default=None, metavar="SECONDS", help="deadline in seconds"
    )
    call.add_argument("--session", default=None, metavar="ID", help="run the call in this session")
    call.add_argument(
        "--stream",
        action="store_true",
        help="the handler is a generator: print each item as a line of JSON as it comes",
    )
    call.add_argument("-v", "--verbose", action="store_true", help="show the pool's log events")
    top = commands.add_parser(
        "top",
        help="a live table of a pool's workers: a pool of TARGET this command starts "
        "(the demo worker under load by default), or a running service's status page (--url)",
    )
    top.add_argument(
        "target",
        nargs="?",
        type=_target,
        default=None,
        help=f"MODULE:ATTR (default: {_DEMO_TARGET})",
    )
    top.add_argument("--size", type=_workers, default=2, help="workers in the pool (default 2)")
    top.add_argument(
        "--url", help="read a running service's status page instead (its address, or status.json)"
    )
    top.add_argument(
        "--duration",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="stop after SECONDS (default: Ctrl-C)",
    )
    top.add_argument(
        "--interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "--no-load", action="store_true", help="do not run the demo load on the demo worker"
    )
    top.add_argument(
        "--crash-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="demo load: kill a worker every SECONDS to show its replacement (0: never; "
        "default 10)",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="show the pool's log events")
    commands.add_parser(
        "bench",
        add_help=False,  # its options are the harness's: `corral bench --help` shows them
        help="run the benchmark table of a source checkout, with a progress bar",
    )
    commands.add_parser("version", help="print corral's version")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.command == "version":
        sys.stdout.write(f"corral {__version__}\n")
        return 0
    if args.command == "bench":
        _configure_logging(False)
        return _bench_main(rest)  # it says itself if rich is missing (not for --help)
    _configure_logging(args.verbose)
    if args.command == "call":
        call_parser = commands.choices["call"]
        problem = _target_problem(args.target)
        if problem is not None:
            call_parser.error(problem)
        try:
            return asyncio.run(_call_once(args))
        except _Usage as exc:
            call_parser.error(str(exc))
        except KeyboardInterrupt:
            sys.stderr.write("interrupted; the pool was closed\n")
            return 130
    if args.command == "top":
        top_parser = commands.choices["top"]
        if args.url is not None and args.target is not None:
            top_parser.error("top takes a TARGET or --url, not both")
        problem = None if args.target is None else _target_problem(args.target)
        if problem is not None:
            top_parser.error(problem)
        return _needs_rich(lambda: _top_main(args))
    from ._demo import run_demo

    try:
        asyncio.run(run_demo(size=args.size))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the pool was closed\n")
        return 130
    return 0


_DEMO_TARGET = "corral._demo_app:app"


def _positive(text: str) -> float:
    """A number of seconds from the command line, by the rule every timeout follows."""
    from ._door import check_seconds

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    try:
        return check_seconds(value, "SECONDS")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 worker, got {value}")
    return value


def _cwd_on_path() -> None:
    """A target in the current directory is found, as ``python -m`` would find it."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _target(text: str) -> str:
    """MODULE:ATTR, by the rule the pool follows (``check_target``: its shape, and an
    attribute that is plainly not an App), before any process starts."""
    from ._target_check import check_target

    _cwd_on_path()
    try:
        return check_target(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _target_problem(target: str) -> str | None:
    """Why ``target``'s module cannot be found from here (checked before any process
    starts, without importing the module itself), or None."""
    _cwd_on_path()
    module = target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:  # a parent package that fails to import
        return f"cannot look up module {module!r} of {target!r}: {exc}"
    if found is None:
        return (
            f"no module named {module!r} (of {target!r}) in {os.getcwd()} or on the "
            "Python path: run from the directory that holds it, or set PYTHONPATH"
        )
    return None


class _Usage(Exception):
    """A mistake in the command line found once the worker answered (exit code 2)."""


def _needs_rich(command: Callable[[], int]) -> int:
    try:
        import rich  # noqa: F401 - only to give a clear error before anything starts
    except ImportError:
        sys.stderr.write(
            f"this command draws with rich, which is not installed: {install_command('cli')}\n"
        )
        return 2
    return command()


def _top_main(args: argparse.Namespace) -> int:
    from . import WorkerStartError
    from ._top import top_pool, top_url

    try:
        if args.url is not None:
            return top_url(args.url, duration=args.duration, interval=args.interval)
        target = args.target or _DEMO_TARGET
        return asyncio.run(
            top_pool(
                target,
                size=args.size,
                duration=args.duration,
                interval=args.interval,
                load=target == _DEMO_TARGET and not args.no_load,
                crash_every=args.crash_every or None,
            )
        )
    except KeyboardInterrupt:  # Ctrl-C is how top ends; any pool was closed
        return 0
    except WorkerStartError as exc:
        sys.stderr.write(f"corral top: {_start_failure(exc)}\n")
        return 1


def _bench_main(argv: list[str]) -> int:
    from ._bench import run_bench

    return run_bench(argv)


_LOOKS_LIKE_JSON = re.compile(r'\s*[\[{"]')


def _parse_argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if _LOOKS_LIKE_JSON.match(text):  # meant as JSON: passing it as text would surprise
            raise argparse.ArgumentTypeError(
                f"{text!r} is not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        return text


async def _call_once(args: argparse.Namespace) -> int:
    """One worker, one call: the result on stdout as JSON (each item, with --stream),
    a corral error on stderr (exit code 1), a mistake in the command line as _Usage."""
    from . import CorralError, MethodNotFound, Pool, RemoteError, WorkerStartError

    method: str = args.method
    try:
        pool = Pool(args.target, size=1)
    except (TypeError, ValueError) as exc:
        raise _Usage(str(exc)) from None
    handlers: tuple[str, ...] = ()
    try:
        async with pool:
            handlers = tuple(pool.workers[0].handlers) if pool.workers else ()
            if handlers and method not in handlers:
                raise _Usage(_no_such_handler(args.target, method, handlers))
            if args.stream:
                stream = pool.stream(method, *args.args, session=args.session, timeout=args.timeout)
                async for item in stream:
                    _print_json(item)
            else:
                _print_json(
                    await pool.call(method, *args.args, session=args.session, timeout=args.timeout)
                )
    except MethodNotFound:
        raise _Usage(_no_such_handler(args.target, method, handlers)) from None
    except RemoteError as exc:
        if exc.type == "TypeError" and "use pool.stream()" in exc.message:
            raise _Usage(f"{method!r} streams its results: add --stream") from None
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    except WorkerStartError as exc:
        sys.stderr.write(f"corral call: {_start_failure(exc)}\n")
        return 1
    except CorralError as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    except (TypeError, ValueError) as exc:  # refused at the call site: nothing was sent
        raise _Usage(str(exc)) from None
    return 0


def _no_such_handler(target: str, method: str, handlers: tuple[str, ...]) -> str:
    return f"{target} has no handler {method!r}; its handlers: {', '.join(handlers) or 'none'}"


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=repr) + "\n")
    sys.stdout.flush()


def _start_failure(exc: Exception) -> str:
    """A worker that could not start, in one line: what failed and the exception it
    printed last (the full traceback is in the error's stderr tail, with -v)."""
    first = str(getattr(exc, "message", exc)).splitlines()[0]
    tail = [line for line in (getattr(exc, "stderr_tail", None) or "").splitlines() if line]
    last = tail[-1].strip() if tail else ""
    return f"{first}: {last}" if last else first


if __name__ == "__main__":
    sys.exit(main())
