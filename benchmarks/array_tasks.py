"""Task functions for the array benchmarks (module level, so every system can run them)."""

from __future__ import annotations

from typing import Any


def noop() -> None:
    return None


def echo(value: Any) -> Any:
    return value


TASKS = {"noop": noop, "echo": echo}
