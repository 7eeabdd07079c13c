"""Handlers for the streamed-buffer tests: arrays over TCP, with and without compression."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from corral.worker import App

app = App(sync_mode="inline")


@app.handler
def echo(value: Any) -> Any:
    return value


@app.handler
def modules(names: list[str]) -> list[str]:
    """Which of ``names`` this worker has imported."""
    return sorted(name for name in names if name in sys.modules)


@app.handler
def ramp(n: int) -> Any:
    """A float64 array 0..n-1, compressible."""
    import numpy as np

    return np.arange(n, dtype="<f8")


@app.handler
def ramps(n: int, count: int) -> Any:
    import numpy as np

    for k in range(count):
        yield np.full(n, float(k))


@app.handler
def die_while_streaming(n: int) -> Any:
    """Return a large array, but die half-way through writing its buffer to the socket."""
    import numpy as np

    import corral._streamed

    def write_half_then_die(fd: int, chunks: list[memoryview]) -> None:
        data = b"".join(bytes(c) for c in chunks)
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    corral._streamed._write_all = write_half_then_die
    return np.ones(n)


@app.handler
def wait_for_fifo(path: str, value: Any) -> Any:
    """Block the worker until a byte arrives on the FIFO at ``path``; return ``value``."""
    with open(path, "rb", buffering=0) as fifo:
        fifo.read(1)
    return value


@app.handler
async def aramp(n: int) -> Any:
    """``ramp`` from the worker's event loop thread (sync handlers run on its main thread)."""
    import numpy as np

    return np.arange(n, dtype="<f8")


@app.handler
def switch_often() -> None:
    """Make this worker's threads take turns as often as the interpreter allows."""
    sys.setswitchinterval(1e-6)
