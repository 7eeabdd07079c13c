"""Handlers for the checks at the door: a failing assertion, and a plain function target."""

from __future__ import annotations

from corral.worker import App

app = App()


@app.handler
def positive(n: int) -> int:
    assert n > 0
    return n


@app.handler
async def numbers(n: int):
    for i in range(n):
        yield i


def add(a: int, b: int) -> int:
    """A plain function: not an App, and not a factory either (it needs arguments)."""
    return a + b


async def fetch(url: str) -> str:
    """A coroutine function: not an App."""
    return url


def make_app() -> App:
    """A factory: called with no arguments in the worker, it returns the App."""
    return app
