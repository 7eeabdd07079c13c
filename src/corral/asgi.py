"""corral in a Starlette or FastAPI application: lifespan, dependencies, streaming, health.

Owns: opening pools in an ASGI lifespan and closing them at shutdown; the
lifespan state keys the pools are found under; the request dependencies
(``get_pool``, ``pool_dependency``, ``checkout_dependency``); the streaming
response fed by a ``CallStream``; the liveness and readiness endpoints; which
pool the status page (``status_app``, built in ``_status_page``) shows. Must not
touch: the pool's internals (only its public API), the worker side, or the
server (no uvicorn import, no process or signal handling).

    from fastapi import Depends, FastAPI
    from corral import Pool
    from corral.asgi import get_pool, health_routes, pool_lifespan

    app = FastAPI(lifespan=pool_lifespan(lambda: Pool("myapp.workers:app", size=4)))
    app.router.routes.extend(health_routes())

    @app.post("/add")
    async def add(a: int, b: int, pool: Pool = Depends(get_pool)) -> int:
        return await pool.call("add", a, b, timeout=5.0)

The pools are created and started in the lifespan, in the serving process, never
at import time: a pool made before a fork belongs to the parent. They are
exposed through the lifespan state (``request.state``) under ``POOL_KEY`` (the
first pool) and ``POOLS_KEY`` (every pool, by ``Pool.name``).

Needs Starlette (``pip install 'corral[asgi]'``); FastAPI is optional: the
dependencies are plain functions of a Starlette ``HTTPConnection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, TypedDict

try:
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "corral.asgi needs Starlette, which is not installed: "
        "install the extra with `pip install 'corral[asgi]'` (FastAPI brings it too)"
    ) from exc

from ._door import check_timeout
from ._pool import CallStream, Pool, WorkerLease
from ._pools import Pools
from ._routing_page import build_routing_app
from ._status_page import build_status_app

__all__ = [
    "FRONT_KEY",
    "POOLS_KEY",
    "POOL_KEY",
    "FrontSource",
    "FrontState",
    "CallStreamResponse",
    "Encoder",
    "PoolSource",
    "PoolState",
    "checked_out_worker",
    "checkout_dependency",
    "front_lifespan",
    "get_front",
    "get_pool",
    "health_routes",
    "liveness",
    "ndjson",
    "open_front",
    "open_pools",
    "pool_dependency",
    "pool_lifespan",
    "readiness",
    "routing_status_app",
    "sse",
    "status_app",
    "stream_response",
]

POOL_KEY: Final = "corral_pool"
"""Lifespan state key of the first pool given to ``pool_lifespan``/``open_pools``."""

POOLS_KEY: Final = "corral_pools"
"""Lifespan state key of every pool, as a dict keyed by ``Pool.name``."""

PoolSource = Pool | Callable[[], Pool]
"""A pool, or (better) a zero-argument callable that builds one at startup."""

FRONT_KEY: Final = "corral_front"
"""Lifespan state key of the ``corral.Pools`` front opened by ``front_lifespan``/``open_front``."""

FrontSource = Pools | Callable[[], Pools]
"""A Pools front, or (better) a zero-argument callable that builds one at startup."""


class PoolState(TypedDict):
    """What the lifespan yields; Starlette copies it into every request's ``state``."""

    corral_pool: Pool
    corral_pools: dict[str, Pool]


# --- lifespan ---------------------------------------------------------------------


def _check_sources(sources: tuple[PoolSource, ...]) -> None:
    if not sources:
        raise TypeError("give at least one Pool or a callable that returns one")
    for source in sources:
        if not isinstance(source, Pool) and not callable(source):
            raise TypeError(f"expected a Pool or a callable returning one, got {source!r}")


def _build(source: PoolSource) -> Pool:
    pool = source if isinstance(source, Pool) else source()
    if not isinstance(pool, Pool):
        raise TypeError(f"the pool factory {source!r} returned {pool!r}, not a corral.Pool")
    return pool


async def _close_all(pools: list[Pool]) -> None:
    """Close the pools concurrently (each is bounded by its own shutdown timeouts)."""
    outcomes = await asyncio.gather(*(pool.aclose() for pool in pools), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


@contextlib.asynccontextmanager
async def open_pools(*pools: PoolSource) -> AsyncIterator[PoolState]:
    """Build and start the pools, yield them as lifespan state, close them on exit.

    Each argument is a ``Pool`` or a zero-argument callable returning one (a
    factory, so the pool is built in the process that serves, at startup). They
    are started in order; if one fails to start, those already started are
    closed and the error propagates (the server then refuses to start). On exit
    every pool is closed, concurrently: calls in flight drain, workers stop.

    For an application that has a lifespan of its own::

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            async with open_pools(make_pool) as pools, make_db() as db:
                yield {**pools, "db": db}
    """
    _check_sources(pools)
    started: list[Pool] = []
    try:
        for source in pools:
            pool = _build(source)
            if any(p.name == pool.name for p in started):
                raise ValueError(f"two pools are named {pool.name!r}: give each a distinct name=")
            await pool.start()  # a pool that fails to start closes itself
            started.append(pool)
        yield {POOL_KEY: started[0], POOLS_KEY: {p.name: p for p in started}}
    finally:
        await _close_all(started)


def pool_lifespan(
    *pools: PoolSource,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[PoolState]]:
    """A ``lifespan=`` for ``Starlette(...)`` or ``FastAPI(...)`` that runs ``open_pools``.

    ``FastAPI(lifespan=pool_lifespan(lambda: Pool("myapp.workers:app", size=4)))``:
    the pools start when the server starts the application and close when it
    shuts it down. Requests find them in ``request.state`` (see ``get_pool``).
    """
    _check_sources(pools)

    def lifespan(app: Any) -> contextlib.AbstractAsyncContextManager[PoolState]:
        return open_pools(*pools)

    return lifespan


class FrontState(TypedDict):
    """What ``open_front`` yields: the front, and its pools as ``open_pools`` would."""

    corral_pool: Pool
    corral_pools: dict[str, Pool]
    corral_front: Pools


@contextlib.asynccontextmanager
async def open_front(source: FrontSource) -> AsyncIterator[FrontState]:
    """Build and start a ``corral.Pools`` front, yield it as lifespan state, close it on exit.

    Its pools start together (if one cannot start, the others are closed and
    the error propagates, so the server refuses to start) and close together.
    The state also holds the pools under ``POOL_KEY`` (the first) and
    ``POOLS_KEY`` (by name), so ``get_pool``, ``pool_dependency``,
    ``health_routes`` and ``status_app`` work as with ``open_pools``.
    """
    front = source if isinstance(source, Pools) else source()
    if not isinstance(front, Pools):
        raise TypeError(f"the front factory {source!r} returned {front!r}, not a corral.Pools")
    async with front:
        pools = front.pools
        yield {POOL_KEY: next(iter(pools.values())), POOLS_KEY: pools, FRONT_KEY: front}


def front_lifespan(
    source: FrontSource,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[FrontState]]:
    """A ``lifespan=`` for ``Starlette(...)``/``FastAPI(...)`` that runs ``open_front``.

    ``FastAPI(lifespan=front_lifespan(make_front))``: one entry opens and
    closes every pool of the front. Requests find it with ``get_front``.
    """
    if not isinstance(source, Pools) and not callable(source):
        raise TypeError(f"expected a Pools or a callable returning one, got {source!r}")

    def lifespan(app: Any) -> contextlib.AbstractAsyncContextManager[FrontState]:
        return open_front(source)

    return lifespan


# --- dependencies -------------------------------------------------------------------


def _state_value(conn: HTTPConnection, key: str) -> Any:
    return getattr(conn.state, key, None)


def _pool_of(conn: HTTPConnection, name: str | None) -> Pool:
    if name is None:
        pool = _state_value(conn, POOL_KEY)
        where = f"request.state.{POOL_KEY}"
    else:
        pools = _state_value(conn, POOLS_KEY)
        pool = pools.get(name) if isinstance(pools, dict) else None
        where = f"request.state.{POOLS_KEY}[{name!r}]"
    if not isinstance(pool, Pool):
        raise RuntimeError(
            f"no corral pool at {where}: give the application lifespan=pool_lifespan(...), "
            "or yield the state of open_pools(...) from its own lifespan"
        )
    return pool


def get_pool(request: HTTPConnection) -> Pool:
    """The application's (first) pool, from the lifespan state.

    A dependency: ``pool: Annotated[Pool, Depends(get_pool)]`` in FastAPI, or
    ``get_pool(request)`` in a Starlette endpoint. Raises RuntimeError when the
    lifespan did not open a pool (a configuration error, so a 500).
    """
    return _pool_of(request, None)


def pool_dependency(name: str) -> Callable[[HTTPConnection], Pool]:
    """A dependency like ``get_pool`` for the pool named ``name`` (``Pool(name=...)``)."""

    def get_named_pool(request: HTTPConnection) -> Pool:
        return _pool_of(request, name)

    get_named_pool.__name__ = f"get_pool_{name}"
    return get_named_pool


def checkout_dependency(
    session_header: str | None = "X-Session",
    *,
    timeout: float | None = None,
    pool: str | None = None,
) -> Callable[[HTTPConnection], AsyncIterator[WorkerLease]]:
    """A dependency that holds ``pool.checkout()`` for the length of the request.

    The worker is leased exclusively: no other call reaches it until the lease
    ends. When the request carries the ``session_header`` header (None: never
    look), its value is the checkout's session, so the lease is on the worker
    that holds that session's state. ``timeout`` bounds the wait for a free
    worker (PoolTimeout past it). ``pool`` picks a pool by name (default: the
    first one).

    In FastAPI the lease ends after the response is sent (the default,
    request-scoped dependency), so a streaming response can use the worker; with
    ``Depends(dep, scope="function")`` it ends when the endpoint returns. The
    session is the client's to choose here: derive it from an authenticated
    identity instead when sessions must not be shared (see docs/fastapi.md).
    """
    timeout = check_timeout(timeout)  # a bad one fails here, not on every request

    async def checked_out_worker(request: HTTPConnection) -> AsyncIterator[WorkerLease]:
        target = _pool_of(request, pool)
        session = request.headers.get(session_header) if session_header else None
        async with target.checkout(session=session or None, timeout=timeout) as lease:
            yield lease

    return checked_out_worker


checked_out_worker = checkout_dependency()
"""``checkout_dependency()``: a lease on a worker, in the session named by ``X-Session``."""


# --- streaming -------------------------------------------------------------------------

Encoder = Callable[[Any], bytes | str]
"""Turns one streamed item into the bytes (or text) of the response body."""


def ndjson(item: Any) -> bytes:
    """Encode one item as a line of JSON (``application/x-ndjson``)."""
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def sse(item: Any) -> bytes:
    """Encode one item as a server-sent event (``text/event-stream``).

    A string is sent as is (one ``data:`` line per line of it); anything else as JSON.
    """
    text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return "".join(f"data: {line}\n" for line in text.split("\n")).encode() + b"\n"


class CallStreamResponse(StreamingResponse):
    """A ``StreamingResponse`` whose body is what a ``CallStream`` yields, encoded.

    The first item is awaited before the status line is sent, so an error that
    comes before the handler yields anything (no worker free before the
    deadline, the method does not exist, the handler raised at once) propagates
    as an ordinary exception that the application's exception handlers can turn
    into an error response. After that, an error ends the response early.

    The stream is closed on every way out: the handler finished, the client
    disconnected (the server's disconnect message, or a failed send), the
    request was cancelled, or encoding failed. Closing cancels the handler in
    the worker if it is still running.
    """

    def __init__(
        self,
        stream: CallStream,
        *,
        encode: Encoder | None = None,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        if not isinstance(stream, CallStream):
            raise TypeError(f"expected the CallStream of pool.stream(...), got {stream!r}")
        super().__init__(stream, status_code=status_code, headers=headers, media_type=media_type)
        self.call_stream = stream
        self.encode = encode

    def _chunk(self, item: Any) -> bytes:
        data = item if self.encode is None else self.encode(item)
        if isinstance(data, str):
            return data.encode(self.charset)
        if isinstance(data, bytes | bytearray | memoryview):
            return bytes(data)
        raise TypeError(
            f"stream item {data!r} is neither bytes nor str: pass encode= to stream_response "
            "(corral.asgi.ndjson or corral.asgi.sse, for instance)"
        )

    async def stream_response(self, send: Send) -> None:
        """Send the status line once the first item is there, then every item as it comes."""
        stream = self.call_stream
        try:
            first: bytes | None = self._chunk(await anext(stream))
        except StopAsyncIteration:
            first = None
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for item in stream:
                chunk = self._chunk(item)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.call_stream.aclose()  # synchronous underneath: safe while cancelled


def stream_response(
    stream: CallStream,
    *,
    media_type: str | None = None,
    encode: Encoder | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> CallStreamResponse:
    """A streaming response fed by ``pool.stream(...)``; see ``CallStreamResponse``.

    ``encode`` turns each item into bytes or str (str is encoded with the
    response's charset); without it, items must already be bytes or str.
    ``ndjson`` and ``sse`` are ready-made encoders::

        return stream_response(pool.stream("tokens", prompt), media_type="text/event-stream",
                               encode=sse)
    """
    return CallStreamResponse(
        stream, encode=encode, status_code=status_code, headers=headers, media_type=media_type
    )


# --- health ----------------------------------------------------------------------------


def get_front(request: HTTPConnection) -> Pools:
    """The application's ``corral.Pools`` front, from the lifespan state.

    A dependency: ``pools: Annotated[Pools, Depends(get_front)]``. Raises
    RuntimeError when the lifespan did not open one (``front_lifespan``).
    """
    front = _state_value(request, FRONT_KEY)
    if not isinstance(front, Pools):
        raise RuntimeError(
            f"no corral front at request.state.{FRONT_KEY}: give the application "
            "lifespan=front_lifespan(...), or yield the state of open_front(...) from its own"
        )
    return front


_NO_STORE = {"Cache-Control": "no-store"}


def _pools_of(conn: HTTPConnection) -> dict[str, Pool]:
    pools = _state_value(conn, POOLS_KEY)
    if isinstance(pools, dict) and pools:
        return {name: p for name, p in pools.items() if isinstance(p, Pool)}
    pool = _state_value(conn, POOL_KEY)
    return {pool.name: pool} if isinstance(pool, Pool) else {}


def _stats_body(pool: Pool) -> dict[str, Any]:
    stats = pool.stats()
    return {**dataclasses.asdict(stats), "ready": stats.ready, "live": stats.live}


async def liveness(request: Request) -> JSONResponse:
    """200 while the application's pools exist and none is closed, else 503.

    A failed pool (workers keep failing to start) is still alive: it keeps
    trying, and restarting the process would not help. Readiness says whether
    it can serve.
    """
    pools = _pools_of(request)
    closed = sorted(name for name, pool in pools.items() if pool.stats().closed)
    if not pools:
        body: dict[str, Any] = {"status": "down", "reason": "no pool in the lifespan state"}
    elif closed:
        body = {"status": "down", "reason": f"closed: {', '.join(closed)}"}
    else:
        body = {"status": "alive"}
    status = 200 if body["status"] == "alive" else 503
    return JSONResponse(body, status_code=status, headers=_NO_STORE)


async def readiness(request: Request) -> JSONResponse:
    """200 when every pool has a worker ready and is neither failed nor closed, else 503.

    The body is each pool's ``stats()`` (plus ``ready`` and ``live``), by pool name.
    """
    pools = _pools_of(request)
    bodies = {name: _stats_body(pool) for name, pool in pools.items()}
    ready = bool(bodies) and all(
        body["ready"] > 0 and not body["failed"] and not body["closed"] for body in bodies.values()
    )
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "pools": bodies},
        status_code=200 if ready else 503,
        headers=_NO_STORE,
    )


def health_routes(path_prefix: str = "/health") -> list[Route]:
    """``GET {path_prefix}/live`` (``liveness``) and ``GET {path_prefix}/ready`` (``readiness``).

    Starlette: ``Starlette(routes=[*health_routes(), ...])``. FastAPI:
    ``app.router.routes.extend(health_routes())``. They stay out of the OpenAPI schema.
    """
    if path_prefix and not path_prefix.startswith("/"):
        raise ValueError(f"path_prefix must start with '/', got {path_prefix!r}")
    prefix = path_prefix.rstrip("/")
    return [
        Route(
            f"{prefix}/live",
            liveness,
            methods=["GET"],
            name="corral_liveness",
            include_in_schema=False,
        ),
        Route(
            f"{prefix}/ready",
            readiness,
            methods=["GET"],
            name="corral_readiness",
            include_in_schema=False,
        ),
    ]


# --- status page -----------------------------------------------------------------------


def status_app(
    pool: Pool | None = None, *, name: str | None = None, interval: float = 1.0
) -> Starlette:
    """A live status page for a pool: an ASGI app to mount anywhere.

    ``GET /`` is one self-contained HTML page (no external assets) showing each
    worker (pid, state, uptime, calls served, calls in flight, sessions, RSS),
    the callers waiting, and the recent evictions with their reasons; it
    refreshes itself every ``interval`` seconds. ``GET /status.json`` is the
    same data (``Pool.status(rss=True).to_dict()``).

    With ``pool``, the page shows that pool. Without it, it shows the pool of
    the application's lifespan state (``pool_lifespan``/``open_pools``): the
    first one, or the one named ``name``. Mount it::

        app.mount("/corral", status_app())                       # FastAPI
        Starlette(routes=[Mount("/corral", status_app())], ...)  # Starlette

    The page shows pids, targets and error reasons: mount it where only
    operators can reach it.
    """
    if pool is not None and not isinstance(pool, Pool):
        raise TypeError(f"status_app() takes a corral.Pool or nothing, got {pool!r}")
    if pool is not None and name is not None:
        raise ValueError("give status_app() a pool or a pool name, not both")
    if not interval > 0:
        raise ValueError(f"interval must be > 0 seconds, got {interval!r}")

    def find_pool(conn: HTTPConnection) -> Pool:
        return pool if pool is not None else _pool_of(conn, name)

    return build_status_app(find_pool, interval=interval)


def routing_status_app(front: Pools | None = None, *, interval: float = 1.0) -> Starlette:
    """A live page for a ``corral.Pools`` front: an ASGI app to mount anywhere.

    ``GET /`` shows a row per pool (its state, its breaker and what the front
    sent there), per pool a chart of the last five minutes (calls/s,
    failures/s, p50 and p99 latency, with breaker transitions and evictions
    marked), the workloads and rules, and the breakers' history.
    ``GET /routing.json`` is the same data (``Pools.status()``). Self-contained,
    like ``status_app``: no external asset. Without ``front`` it shows the front
    of the lifespan state (``front_lifespan``/``open_front``)::

        app.mount("/corral/routing", routing_status_app())
    """
    if front is not None and not isinstance(front, Pools):
        raise TypeError(f"routing_status_app() takes a corral.Pools or nothing, got {front!r}")
    if not interval > 0:
        raise ValueError(f"interval must be > 0 seconds, got {interval!r}")

    def find_front(conn: HTTPConnection) -> Pools:
        return front if front is not None else get_front(conn)

    return build_routing_app(find_front, interval=interval)
