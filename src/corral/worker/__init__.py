"""Worker side of corral: what runs inside each worker process.

    from corral.worker import App, Context

    app = App()

    @app.handler
    def add(a: int, b: int) -> int:
        return a + b

Start a worker by hand with ``python -m corral.worker MODULE:ATTR``; a ``Pool``
starts them for you.
"""

from ._app import App, Context, Handler, HandlerKind

__all__ = ["App", "Context", "Handler", "HandlerKind"]
