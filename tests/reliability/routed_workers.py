"""Worker app for the routed chaos run: refuses to start while a marker file exists."""

from __future__ import annotations

import asyncio
import os

from corral.worker import App

app = App()


@app.on_startup
def _refuse_while_broken() -> None:
    marker = os.environ.get("CORRAL_TEST_BROKEN", "")
    if marker and os.path.exists(marker):
        raise RuntimeError(f"refusing to start: {marker} exists")


@app.handler
async def work(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()
