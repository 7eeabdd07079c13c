"""The worker side of the FastAPI example: runs inside each worker process.

Target string: ``"examples.fastapi_app.worker:app"``. Nothing here knows about
HTTP; these are ordinary corral handlers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from corral.worker import App, Context

app = App("fastapi-example")


@app.handler
def add(a: float, b: float) -> float:
    return a + b


@app.handler
def chat(message: str, *, ctx: Context) -> dict[str, Any]:
    """One turn of a conversation; the history lives in this worker, per session."""
    assert ctx.session is not None, "chat is called with session=..."
    history: list[str] = ctx.session.setdefault("history", [])
    history.append(message)
    return {
        "reply": f"message {len(history)} received: {message}",
        "history": list(history),
        "worker_pid": os.getpid(),
    }


@app.handler
async def words(text: str, delay: float = 0.0) -> AsyncIterator[str]:
    """Yields the words of ``text`` one by one, as a model streams tokens."""
    for word in text.split():
        if delay:
            await asyncio.sleep(delay)
        yield word
