"""Handlers for calls that wait in the pool's queue: what ran, and in what order."""

from __future__ import annotations

import threading
import time

from corral.worker import App, Context

app = App()
_tickets = 0
_lock = threading.Lock()


@app.handler
def ticket() -> int:
    """How many ``ticket`` calls this worker has run, this one included."""
    global _tickets
    with _lock:
        _tickets += 1
        return _tickets


@app.handler
def tickets() -> int:
    """How many ``ticket`` calls have run (without running one)."""
    return _tickets


@app.handler
def hold(seconds: float, *, ctx: Context) -> bool:
    """Keep the worker busy until ``seconds`` pass or the call is cancelled."""
    return ctx.wait_cancelled(seconds)


@app.handler
def echo(value: object) -> object:
    return value


@app.handler
def crash() -> None:
    time.sleep(0.05)
    import os

    os._exit(3)


@app.handler
def pid() -> int:
    import os

    return os.getpid()


@app.handler
def boom(i: int) -> None:
    raise ValueError(f"boom {i}")


@app.handler
def big(n: int) -> bytes:
    return b"x" * n


@app.handler
def shout(text: str) -> str:
    print(text)  # the worker's stdout goes to stderr, never into the protocol
    return text
