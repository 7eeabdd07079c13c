"""corral.asgi with a plain Starlette application: lifespan state, dependencies,
streaming responses that close their stream, and the health probes.

The applications run through their real lifespan (``LifespanManager``) with
real workers; requests go through ``httpx.ASGITransport``, or straight to the
ASGI callable where a test needs to play the server (a client that disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

import corral
from corral import Pool, WorkerLease
from corral.asgi import (
    POOL_KEY,
    POOLS_KEY,
    checked_out_worker,
    checkout_dependency,
    get_pool,
    health_routes,
    ndjson,
    open_pools,
    pool_dependency,
    pool_lifespan,
    sse,
    stream_response,
)

TARGET = "tests.workers.basic:app"
LIFESPAN_TIMEOUT = 30.0  # real workers start here; asgi-lifespan's default is 5 s


class Factory:
    """A pool factory that remembers the pools it built, so tests can look at them."""

    def __init__(self, target: str = TARGET, **options: Any) -> None:
        self.target = target
        self.options = {"size": 1, **options}
        self.made: list[Pool] = []

    def __call__(self) -> Pool:
        pool = Pool(self.target, **self.options)
        self.made.append(pool)
        return pool

    @property
    def pool(self) -> Pool:
        (pool,) = self.made
        return pool


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[tuple[ASGIApp, httpx.AsyncClient]]:
    """Run the app's lifespan; yield the app with its state attached, and a client."""
    async with (
        LifespanManager(
            app, startup_timeout=LIFESPAN_TIMEOUT, shutdown_timeout=LIFESPAN_TIMEOUT
        ) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        yield manager.app, client


# --- lifespan and get_pool ----------------------------------------------------------


async def test_the_lifespan_starts_the_pool_and_puts_it_in_the_request_state() -> None:
    factory = Factory(name="main")

    async def endpoint(request: Request) -> JSONResponse:
        pool = get_pool(request)
        assert pool is request.state.corral_pool is request.state.corral_pools["main"]
        return JSONResponse({"name": pool.name, "sum": await pool.call("add", 2, 3)})

    app = Starlette(routes=[Route("/", endpoint)], lifespan=pool_lifespan(factory))
    assert factory.made == []  # nothing is built before the lifespan runs
    async with serve(app) as (_, client):
        assert factory.pool.stats().ready == 1
        assert (await client.get("/")).json() == {"name": "main", "sum": 5}
    assert factory.pool.stats().closed
    assert factory.pool.stats().live == 0


async def test_several_pools_are_found_by_name() -> None:
    first, second = Factory(name="first"), Factory(name="second")
    get_second = pool_dependency("second")

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse([get_pool(request).name, get_second(request).name])

    app = Starlette(routes=[Route("/", endpoint)], lifespan=pool_lifespan(first, second))
    async with serve(app) as (_, client):
        assert (await client.get("/")).json() == ["first", "second"]
    assert first.pool.stats().closed and second.pool.stats().closed


async def test_open_pools_composes_with_an_application_lifespan() -> None:
    factory = Factory()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_pools(factory) as pools:
            yield {**pools, "greeting": "hello"}

    async def endpoint(request: Request) -> JSONResponse:
        pool = get_pool(request)
        return JSONResponse([request.state.greeting, await pool.call("add", 1, 1)])

    async with serve(Starlette(routes=[Route("/", endpoint)], lifespan=lifespan)) as (_, client):
        assert (await client.get("/")).json() == ["hello", 2]
    assert factory.pool.stats().closed


async def test_a_pool_instance_is_started_and_closed_too() -> None:
    pool = Pool(TARGET, size=1)
    async with open_pools(pool) as state:
        assert state[POOL_KEY] is pool and state[POOLS_KEY] == {pool.name: pool}
        assert await pool.call("add", 1, 2) == 3
    assert pool.stats().closed


async def test_when_a_pool_cannot_start_those_already_started_are_closed() -> None:
    good = Factory(name="good")
    bad = Factory("tests.workers.bad:startup_fails", name="bad")
    with pytest.raises(corral.WorkerStartError, match="model file missing"):
        async with open_pools(good, bad):
            pytest.fail("the lifespan must not start")
    assert good.pool.stats().closed and bad.pool.stats().closed


async def test_two_pools_with_one_name_are_refused_and_nothing_is_left_running() -> None:
    first, second = Factory(name="same"), Factory(name="same")
    with pytest.raises(ValueError, match="two pools are named 'same'"):
        async with open_pools(first, second):
            pytest.fail("the lifespan must not start")
    assert first.pool.stats().closed
    assert second.pool.stats().live == 0


def test_the_arguments_are_checked_when_the_lifespan_is_made() -> None:
    with pytest.raises(TypeError, match="at least one"):
        pool_lifespan()
    with pytest.raises(TypeError, match="a Pool or a callable"):
        pool_lifespan("tests.workers.basic:app")  # type: ignore[arg-type]


async def test_a_factory_must_return_a_pool() -> None:
    with pytest.raises(TypeError, match=r"not a corral\.Pool"):
        async with open_pools(lambda: "a pool?"):  # type: ignore[arg-type,return-value]
            pytest.fail("the lifespan must not start")


async def test_get_pool_without_the_lifespan_is_a_clear_error() -> None:
    async def endpoint(request: Request) -> Response:
        get_pool(request)
        return Response()

    app = Starlette(routes=[Route("/", endpoint)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        with pytest.raises(RuntimeError, match=r"no corral pool at request\.state\.corral_pool"):
            await client.get("/")


# --- checkout dependency ---------------------------------------------------------------


def lease_endpoint(
    dependency: Callable[[Request], AsyncIterator[WorkerLease]],
) -> Callable[[Request], Any]:
    """A Starlette endpoint that uses a checkout dependency as FastAPI would."""

    async def endpoint(request: Request) -> JSONResponse:
        async with contextlib.asynccontextmanager(dependency)(request) as worker:
            whoami = await worker.call("whoami")
            return JSONResponse(
                {
                    "pid": worker.pid,
                    "session": worker.session,
                    "seen_session": whoami["session"],
                    "leased": get_pool(request).stats().leased,
                }
            )

    return endpoint


async def test_the_checkout_dependency_holds_a_worker_for_the_request() -> None:
    factory = Factory(size=2)
    app = Starlette(
        routes=[
            Route("/lease", lease_endpoint(checked_out_worker)),
            Route("/user", lease_endpoint(checkout_dependency(session_header="X-User"))),
        ],
        lifespan=pool_lifespan(factory),
    )
    async with serve(app) as (_, client):
        plain = (await client.get("/lease")).json()
        assert plain["leased"] == 1 and plain["session"] is None
        assert factory.pool.stats().leased == 0  # released once the request is over

        home = (await factory.pool.call("whoami", session="s1"))["pid"]
        for _ in range(3):
            leased = (await client.get("/lease", headers={"X-Session": "s1"})).json()
            assert leased["pid"] == home
            assert leased["session"] == leased["seen_session"] == "s1"

        by_user = (await client.get("/user", headers={"X-User": "u1", "X-Session": "no"})).json()
        assert by_user["session"] == "u1"
        assert factory.pool.stats().leased == 0


async def test_with_fastapi_the_lease_lasts_until_the_streamed_response_is_sent() -> None:
    factory = Factory()
    leased_while_streaming: list[int] = []

    app = FastAPI(lifespan=pool_lifespan(factory))

    @app.get("/count")
    async def count(
        worker: Annotated[WorkerLease, Depends(checked_out_worker)], n: int
    ) -> Response:
        pool = factory.pool

        def encode(item: Any) -> bytes:
            leased_while_streaming.append(pool.stats().leased)
            return ndjson(item)

        return stream_response(worker.stream("count", n), encode=encode)

    async with serve(app) as (_, client):
        response = await client.get("/count", params={"n": 5})
        assert response.text.splitlines() == ["0", "1", "2", "3", "4"]
        assert leased_while_streaming == [1] * 5
        assert factory.pool.stats().leased == 0


# --- stream_response --------------------------------------------------------------------


def streaming_app(factory: Factory) -> Starlette:
    async def count(request: Request) -> Response:
        n = int(request.query_params["n"])
        return stream_response(
            get_pool(request).stream("count", n), media_type="application/x-ndjson", encode=ndjson
        )

    async def forever(request: Request) -> Response:
        return stream_response(get_pool(request).stream("count_forever"), encode=ndjson)

    async def missing(request: Request) -> Response:
        return stream_response(get_pool(request).stream("no_such_handler"), encode=ndjson)

    async def raw(request: Request) -> Response:
        return stream_response(get_pool(request).stream("count", 3))  # ints, no encode=

    async def corral_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=503)

    return Starlette(
        routes=[
            Route("/count", count),
            Route("/forever", forever),
            Route("/missing", missing),
            Route("/raw", raw),
        ],
        lifespan=pool_lifespan(factory),
        exception_handlers={corral.CorralError: corral_error},
    )


async def test_a_stream_is_sent_whole_and_the_call_ends() -> None:
    factory = Factory()
    async with serve(streaming_app(factory)) as (_, client):
        response = await client.get("/count", params={"n": 50})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        assert [json.loads(line) for line in response.text.splitlines()] == list(range(50))
        empty = await client.get("/count", params={"n": 0})
        assert empty.status_code == 200 and empty.content == b""
        await factory.pool.wait_idle(timeout=5)
        assert factory.pool.stats().inflight == 0


def http_scope(path: str, spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


class Client:
    """Plays the server for one request: takes ``stop_after`` body chunks, then leaves.

    ``how`` is ``"disconnect"`` (the server reports ``http.disconnect``, ASGI
    spec before 2.4) or ``"send-fails"`` (``send`` raises OSError, spec 2.4).
    """

    def __init__(self, stop_after: int, how: str) -> None:
        self.stop_after = stop_after
        self.how = how
        self.chunks: list[bytes] = []
        self.status: int | None = None
        self.gone = asyncio.Event()
        self._request_sent = False

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone.is_set() and self.how == "send-fails":
            raise OSError("connection reset by peer")
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and message.get("body"):
            self.chunks.append(message["body"])
            if len(self.chunks) >= self.stop_after:
                self.gone.set()


@pytest.mark.parametrize(("how", "spec_version"), [("disconnect", "2.3"), ("send-fails", "2.4")])
async def test_a_client_that_leaves_early_stops_the_handler_in_the_worker(
    how: str, spec_version: str
) -> None:
    factory = Factory()
    async with serve(streaming_app(factory)) as (app, _):
        client = Client(stop_after=3, how=how)
        request = app(http_scope("/forever", spec_version), client.receive, client.send)
        if how == "send-fails":
            with pytest.raises(ClientDisconnect):
                await asyncio.wait_for(request, 10)
        else:
            await asyncio.wait_for(request, 10)
        assert client.status == 200
        assert [json.loads(chunk) for chunk in client.chunks[:3]] == [0, 1, 2]
        pool = factory.pool
        await pool.wait_idle(timeout=5)  # the worker acknowledged the cancel
        stats = pool.stats()
        assert stats.inflight == 0
        assert stats.restarts == 0  # the handler stopped; the worker was not killed
        assert await pool.call("add", 1, 1) == 2


async def test_an_error_before_the_first_item_reaches_the_exception_handlers() -> None:
    factory = Factory()
    async with serve(streaming_app(factory)) as (_, client):
        response = await client.get("/missing")
        assert response.status_code == 503  # not a 200 with an empty body
        assert response.json() == {"error": "MethodNotFound"}
        with pytest.raises(TypeError, match="pass encode= to stream_response"):
            await client.get("/raw")
        await factory.pool.wait_idle(timeout=5)
        assert factory.pool.stats().inflight == 0


def test_stream_response_takes_a_call_stream() -> None:
    with pytest.raises(TypeError, match="CallStream"):
        stream_response(iter([b"x"]))  # type: ignore[arg-type]


def test_the_encoders() -> None:
    assert ndjson({"a": [1, "é"]}) == '{"a":[1,"é"]}\n'.encode()
    assert sse("hello") == b"data: hello\n\n"
    assert sse("two\nlines") == b"data: two\ndata: lines\n\n"
    assert sse({"token": "x"}) == b'data: {"token": "x"}\n\n'


# --- health ----------------------------------------------------------------------------


def health_app(*factories: Factory, prefix: str = "/health") -> Starlette:
    return Starlette(routes=health_routes(prefix), lifespan=pool_lifespan(*factories))


async def test_the_probes_of_a_running_pool() -> None:
    factory = Factory(name="p", size=2)
    async with serve(health_app(factory, prefix="/_internal/")) as (_, client):
        live = await client.get("/_internal/live")
        assert live.status_code == 200 and live.json() == {"status": "alive"}
        assert live.headers["cache-control"] == "no-store"
        ready = await client.get("/_internal/ready")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        stats = body["pools"]["p"]
        assert stats["ready"] == stats["live"] == stats["size"] == 2
        assert stats["calls_failed"] == {}


async def test_readiness_needs_every_pool_ready() -> None:
    first, second = Factory(name="first"), Factory(name="second")
    async with serve(health_app(first, second)) as (_, client):
        assert (await client.get("/health/ready")).status_code == 200
        await second.pool.aclose()
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["pools"]["first"]["ready"] == 1
        assert ready.json()["pools"]["second"]["closed"] is True
        live = await client.get("/health/live")
        assert live.status_code == 503 and live.json()["reason"] == "closed: second"


async def test_a_failed_pool_is_alive_but_not_ready(tmp_path: Any) -> None:
    factory = Factory(
        "tests.workers.bad:dies_after_first_start",
        max_restarts=1,
        restart_backoff=0.01,
        env={"CORRAL_TEST_MARKER": str(tmp_path / "started-once")},
    )
    async with serve(health_app(factory)) as (_, client):
        assert (await client.get("/health/ready")).status_code == 200
        pool = factory.pool
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("die")
        with pytest.raises(corral.PoolFailed):
            await pool.wait_ready(timeout=20)
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        stats = ready.json()["pools"][pool.name]
        assert stats["failed"] is True and stats["ready"] == 0
        assert (await client.get("/health/live")).status_code == 200  # it keeps trying


async def test_the_probes_without_a_pool_say_down() -> None:
    app = Starlette(routes=health_routes())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        assert (await client.get("/health/live")).status_code == 503
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready", "pools": {}}


def test_health_routes_checks_its_prefix() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        health_routes("health")
    assert [route.path for route in health_routes("")] == ["/live", "/ready"]
