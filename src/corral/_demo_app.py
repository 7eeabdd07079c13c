"""The worker app ``corral demo`` runs: a little of everything a real worker does.

Owns: the demo's handlers only. Must not touch: the pool; it is an ordinary
``corral.worker.App`` like any user's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator

from corral.worker import App, Context

app = App("corral-demo")

_model: dict[str, int] = {}


@app.on_startup
def load_model() -> None:
    """Stands for loading a model once per worker."""
    _model.update(
        {
            word: len(word)
            for word in ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
        }
    )


@app.handler
def square(x: int) -> int:
    return x * x


@app.handler
def digest(data: bytes, rounds: int = 200) -> str:
    """A little CPU work: repeated hashing."""
    value = data
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()[:16]


@app.handler
def chat(message: str, *, ctx: Context) -> dict[str, object]:
    """Per-session state: each session keeps its own history in this worker."""
    assert ctx.session is not None
    history = ctx.session.setdefault("history", [])
    history.append(message)
    return {"worker": ctx.worker_id, "turns": len(history), "first": history[0]}


@app.handler
async def tokens(text: str, delay: float = 0.02) -> AsyncIterator[str]:
    """Streams a reply one word at a time, as a language model would."""
    for word in text.split():
        await asyncio.sleep(delay)
        yield word


@app.handler
def think(seconds: float, *, ctx: Context) -> str:
    """Long work that stops early when the caller gives up."""
    if ctx.wait_cancelled(seconds):
        return "stopped early"
    return "done"


@app.handler
def crash() -> None:
    """Dies the hard way, mid-call."""
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
