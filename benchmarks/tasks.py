"""The task functions every system in the benchmark runs (picklable, module level)."""

from __future__ import annotations

import time


def noop() -> None:
    return None


def cpu_1ms() -> int:
    """About one millisecond of pure-Python CPU work."""
    end = time.perf_counter() + 0.001
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def echo(data: bytes) -> bytes:
    return data


TASKS = {"noop": noop, "cpu_1ms": cpu_1ms, "echo": echo}
