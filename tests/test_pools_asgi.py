"""corral.asgi for a Pools front: one lifespan entry, the dependency, the routing page."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from corral import Pool, Pools
from corral.asgi import front_lifespan, get_front, routing_status_app

TARGET = "tests.workers.basic:app"


def make_front() -> Pools:
    return Pools(Pool(TARGET, size=1, name="a"), Pool(TARGET, size=1, name="b"))


async def add(request: Request) -> JSONResponse:
    routed = await get_front(request).call_routed("add", 1, 2, workload="b")
    return JSONResponse({"value": routed.value, "pool": routed.pool})


async def test_one_lifespan_entry_starts_and_closes_every_pool() -> None:
    app = Starlette(
        routes=[Route("/add", add), Mount("/routing", routing_status_app())],
        lifespan=front_lifespan(make_front),
    )
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/add")).json() == {"value": 3, "pool": "b"}
            body = (await client.get("/routing/routing.json")).json()
            assert [p["ready"] for p in body["pools"]] == [1, 1]
        front = manager._state["corral_front"]
    assert all(stats.closed for stats in front.stats().pools.values())


async def test_without_a_front_the_page_says_how_to_get_one() -> None:
    app = Starlette(routes=[Mount("/routing", routing_status_app())])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/routing/routing.json")
    assert response.status_code == 503
    assert "front_lifespan" in response.json()["error"]


def test_the_routing_page_wants_a_front() -> None:
    with pytest.raises(TypeError, match=r"takes a corral\.Pools"):
        routing_status_app(Pool(TARGET, size=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        front_lifespan(42)  # type: ignore[arg-type]
