"""The worker side of the routed example: one app, served by both pools.

Target string: ``"examples.routed_service.worker:app"``. ``summarize`` is the
quick kind of work, ``embed`` the heavy kind; which pool runs them is the
front's business (examples/routed_service/app.py), not the worker's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from corral.worker import App

app = App("routed-example")


@app.handler
async def summarize(text: str) -> dict[str, object]:
    """A stand-in for quick work: the first words, after a short think."""
    await asyncio.sleep(min(0.5, 0.002 * len(text)))
    words = text.split()
    return {"summary": " ".join(words[:8]) + (" …" if len(words) > 8 else ""), "pid": os.getpid()}


@app.handler
def embed(text: str, dimensions: int = 8) -> dict[str, object]:
    """A stand-in for heavy work: a deterministic vector, after a longer think."""
    digest = hashlib.sha256(text.encode()).digest()
    vector = [round(b / 255, 4) for b in digest[:dimensions]]
    return {"vector": vector, "pid": os.getpid()}
