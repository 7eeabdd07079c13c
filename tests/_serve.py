"""Serve an ASGI app with uvicorn on 127.0.0.1 in a thread, for tests that need a real server;
and a service under load whose status page is mounted at /corral.

The listening socket is bound (port 0) before the server starts, so the URL is
known at once and a client that connects early waits in the backlog until the
server (and the app's lifespan) is up: nothing to poll, nothing to sleep on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from corral import Pool
from corral._top import demo_load
from corral.asgi import POOL_KEY, PoolState, open_pools, status_app


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp) -> Iterator[str]:
    """Run ``app`` (lifespan included) until the block ends; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=10,
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the server did not stop within 60 s"


DEMO_TARGET = "corral._demo_app:app"


def status_demo_app(size: int = 2) -> Starlette:
    """A service with a pool of the demo worker under load, its status page at /corral."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[PoolState]:
        async with open_pools(lambda: Pool(DEMO_TARGET, size=size, name="demo")) as state:
            load = asyncio.create_task(demo_load(state[POOL_KEY]))  # no crashes
            try:
                yield state
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)

    return Starlette(routes=[Mount("/corral", status_app())], lifespan=lifespan)
