"""The ``corral`` command line: ``corral demo``, ``corral call``, ``corral version``.

Owns: argument parsing and the logging set-up of the command-line program (an
application, so it may configure structlog; the library never does). Must not
touch: pool internals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
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
    commands.add_parser("version", help="print corral's version")
    args = parser.parse_args(argv)

    if args.command == "version":
        sys.stdout.write(f"corral {__version__}\n")
        return 0
    _configure_logging(args.verbose)
    if args.command == "call":
        return asyncio.run(_call_once(args.target, args.method, args.args, args.timeout))
    from ._demo import run_demo

    try:
        asyncio.run(run_demo(size=args.size))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the pool was closed\n")
        return 130
    return 0


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
