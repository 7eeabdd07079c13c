"""The ``corral`` command line: ``demo``, ``call``, ``top``, ``bench``, ``version``.

Owns: argument parsing and the logging set-up of the command-line program (an
application, so it may configure structlog; the library never does). Must not
touch: pool internals. ``top`` and ``bench`` (``_top``, ``_bench``) load rich,
imported only when those commands run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import structlog

from . import __version__


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral", description="asyncio-native process pools")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a pool of the bundled worker under a mixed load")
    demo.add_argument("--size", type=int, default=2, help="workers in the pool (default 2)")
    demo.add_argument("-v", "--verbose", action="store_true", help="show the pool's log events")
    call = commands.add_parser(
        "call", help="start one worker of TARGET, call METHOD once, print the result as JSON"
    )
    call.add_argument("target", help="MODULE:ATTR naming a corral.worker.App")
    call.add_argument("method")
    call.add_argument(
        "args", nargs="*", help="arguments: each parsed as JSON if it is JSON, else a string"
    )
    call.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    call.add_argument("-v", "--verbose", action="store_true", help="show the pool's log events")
    top = commands.add_parser(
        "top",
        help="a live table of a pool's workers: a pool of TARGET this command starts "
        "(the demo worker under load by default), or a running service's status page (--url)",
    )
    top.add_argument(
        "target", nargs="?", default=None, help=f"MODULE:ATTR (default: {_DEMO_TARGET})"
    )
    top.add_argument("--size", type=int, default=2, help="workers in the pool (default 2)")
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
        return _needs_rich(lambda: _bench_main(rest))
    _configure_logging(args.verbose)
    if args.command == "call":
        return asyncio.run(_call_once(args.target, args.method, args.args, args.timeout))
    if args.command == "top":
        if args.url is not None and args.target is not None:
            parser.error("top takes a TARGET or --url, not both")
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
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _needs_rich(command: Callable[[], int]) -> int:
    try:
        import rich  # noqa: F401 - only to give a clear error before anything starts
    except ImportError:
        sys.stderr.write(
            "this command draws with rich, which is not installed: pip install 'corral[cli]'\n"
        )
        return 2
    return command()


def _top_main(args: argparse.Namespace) -> int:
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


def _bench_main(argv: list[str]) -> int:
    from ._bench import run_bench

    return run_bench(argv)


def _parse_argument(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


async def _call_once(target: str, method: str, raw: list[str], timeout: float | None) -> int:
    """One worker, one call: the result on stdout as JSON, an error on stderr."""
    from . import CorralError, Pool

    sys.path.insert(0, os.getcwd())  # a target in the current directory, as python -m would
    try:
        async with Pool(target, size=1) as pool:
            result = await pool.call(method, *map(_parse_argument, raw), timeout=timeout)
    except CorralError as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(result, default=repr) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
