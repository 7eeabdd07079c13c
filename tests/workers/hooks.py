"""An app whose lifecycle hooks leave traces the tests can see."""

from __future__ import annotations

import asyncio
import os

from corral.worker import App

app = App()


@app.on_startup
async def _warm_up() -> None:
    await asyncio.sleep(0)


@app.on_shutdown
def _say_goodbye() -> None:
    with open(os.environ["CORRAL_TEST_MARKER"], "w") as f:
        f.write("bye")


# The same hook where sync code runs on the sync lane (sync_mode="thread").
lane_app = App(sync_mode="thread")
lane_app.on_shutdown(_say_goodbye)
