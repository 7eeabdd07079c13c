"""An app whose start-up takes far longer than any test allows."""

from __future__ import annotations

import time

from corral.worker import App

app = App()


@app.on_startup
def _load_huge_model() -> None:
    time.sleep(60)
