"""Handlers for the large-buffer tests: sync only, so they run inline on the loop thread.

A handler blocked here blocks the worker's event loop, so calls sent after it stay
in the pipe, with their large-buffer segments still in /dev/shm.
"""

from __future__ import annotations

import os
import signal

from corral.worker import App

app = App(sync_mode="inline")


def pattern(size: int) -> bytes:
    """``size`` bytes that are not all alike, the same on both sides."""
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


@app.handler
def echo(value):
    return value


@app.handler
def echo_all(*args, **kwargs):
    return [list(args), kwargs]


@app.handler
def make(size: int, nested: bool = False):
    data = pattern(size)
    return {"outer": [1, ("x", data)]} if nested else data


@app.handler
def chunks(n: int, size: int):
    for i in range(n):
        yield pattern(size + i)


@app.handler
def pid() -> int:
    return os.getpid()


@app.handler
def make_after_fifo(path: str, size: int) -> bytes:
    """Block (the whole worker) until a byte is written to the FIFO at ``path``."""
    with open(path, "rb", buffering=0) as fifo:
        fifo.read(1)
    return pattern(size)


@app.handler
def die_while_writing(size: int) -> bytes:
    """Return a large result, but die half-way through writing its segment."""
    import corral._shm

    def half_then_die(fd: int, data: memoryview) -> None:
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def copy_half_then_die(mapping, data: memoryview) -> None:  # a pooled segment
        with memoryview(mapping) as target:
            target[: len(data) // 2] = data[: len(data) // 2]
        os.kill(os.getpid(), signal.SIGKILL)

    corral._shm._fill = half_then_die
    corral._shm._copy = copy_half_then_die
    return pattern(size)


@app.handler
def make_many(n: int, size: int) -> list[bytes]:
    """A list of ``n`` buffers of ``size`` bytes: each under the threshold or not."""
    return [pattern(size) for _ in range(n)]


@app.handler
def describe(value) -> list:
    """What the handler received: its type's name, whether it is read-only, its bytes."""
    readonly = value.readonly if isinstance(value, memoryview) else isinstance(value, bytes)
    return [type(value).__name__, readonly, bytes(value)]


#: The same handlers, run on a thread of their own while the event loop reads.
threaded = App(sync_mode="thread")
for _name in ("echo", "describe", "make"):
    threaded.handler(globals()[_name])
