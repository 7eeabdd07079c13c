"""Handlers for the array and table tests (numpy, pyarrow and pandas are imported lazily)."""

from __future__ import annotations

import sys
from typing import Any

from corral.worker import App

app = App(sync_mode="inline")


@app.handler
def echo(value: Any) -> Any:
    return value


@app.handler
def loaded() -> list[str]:
    """Which of the optional libraries this worker has imported."""
    return sorted(name for name in ("numpy", "pyarrow", "pandas") if name in sys.modules)


@app.handler
def filled(n: int, value: float) -> Any:
    """A float64 array of ``n`` items, all ``value``."""
    import numpy as np

    return np.full(n, value)


@app.handler
def object_array() -> Any:
    import numpy as np

    return np.array([object()], dtype=object)


@app.handler
def describe(array: Any) -> list[Any]:
    """What the worker received: dtype, shape, writeable, and the sum."""
    return [str(array.dtype), list(array.shape), bool(array.flags.writeable), float(array.sum())]


@app.handler
def scale_in_place(array: Any, factor: float) -> Any:
    """Write to a received array (copy-on-write: the sender's copy is untouched)."""
    array *= factor
    return array


@app.handler
def die_while_writing(n: int) -> Any:
    """Return a large array, but die half-way through copying it into its segment."""
    import os
    import signal

    import numpy as np

    import corral._shm

    def copy_half_then_die(mapping: Any, data: memoryview) -> None:
        with memoryview(mapping) as target:
            target[: len(data) // 2] = data[: len(data) // 2]
        os.kill(os.getpid(), signal.SIGKILL)

    def fill_half_then_die(fd: int, data: memoryview) -> None:
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    corral._shm._copy = copy_half_then_die
    corral._shm._fill = fill_half_then_die
    return np.ones(n)


@app.handler
def wait_for_fifo(path: str, value: Any) -> Any:
    """Block the worker until a byte arrives on the FIFO at ``path``; return ``value``."""
    with open(path, "rb", buffering=0) as fifo:
        fifo.read(1)
    return value
