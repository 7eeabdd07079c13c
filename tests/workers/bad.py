"""Targets that cannot start, each in its own way."""

from __future__ import annotations

import os
import sys

from corral.worker import App

startup_fails = App()


@startup_fails.on_startup
def _load_model() -> None:
    raise RuntimeError("model file missing: /models/none.bin")


not_an_app = 42

dies_after_first_start = App()


@dies_after_first_start.on_startup
def _only_once() -> None:
    marker = os.environ["CORRAL_TEST_MARKER"]
    if os.path.exists(marker):
        sys.stderr.write("refusing to start again: marker file exists\n")
        raise SystemExit(9)


@dies_after_first_start.handler
def die() -> None:
    with open(os.environ["CORRAL_TEST_MARKER"], "w") as f:
        f.write("x")
    os._exit(1)
