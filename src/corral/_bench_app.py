"""The worker app ``corral bench`` runs: one handler that does nothing.

Owns: ``app``, served by the pools ``corral bench`` measures. Must not touch:
anything else; a no-op call costs what corral costs, and nothing more.
"""

from __future__ import annotations

from corral.worker import App

app = App("corral-bench")


@app.handler
def noop() -> None:
    return None
