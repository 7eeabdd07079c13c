"""The ``corral`` command line: ``corral demo``, ``corral version``.

Owns: argument parsing and the logging set-up of the command-line program (an
application, so it may configure structlog; the library never does). Must not
touch: pool internals.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

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
    commands.add_parser("version", help="print corral's version")
    args = parser.parse_args(argv)

    if args.command == "version":
        sys.stdout.write(f"corral {__version__}\n")
        return 0
    _configure_logging(args.verbose)
    from ._demo import run_demo

    try:
        asyncio.run(run_demo(size=args.size))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the pool was closed\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
