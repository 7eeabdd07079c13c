"""The routed example service (examples/routed_service), run through its real lifespan.

As for the FastAPI example: ``LifespanManager`` runs the lifespan (both pools
start with real worker processes) and ``httpx.AsyncClient`` talks to the app
over ``httpx.ASGITransport``, with no server and no port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from examples.routed_service.app import app

from corral import Pools
from corral.asgi import FRONT_KEY

LIFESPAN_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def running_service() -> AsyncIterator[tuple[Pools, httpx.AsyncClient]]:
    async with (
        LifespanManager(
            app, startup_timeout=LIFESPAN_TIMEOUT, shutdown_timeout=LIFESPAN_TIMEOUT
        ) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://example.test"
        ) as client,
    ):
        yield manager._state[FRONT_KEY], client


@pytest.fixture
async def service() -> AsyncIterator[tuple[Pools, httpx.AsyncClient]]:
    async with running_service() as running:
        yield running


async def test_each_kind_of_work_goes_to_its_pool(service: tuple[Pools, httpx.AsyncClient]) -> None:
    _, client = service
    quick = await client.post("/summarize", json={"text": "one two three"})
    assert quick.status_code == 200, quick.text
    assert quick.json() == {"summary": "one two three", "served_by": "fast"}
    assert quick.headers["X-Served-By"] == "fast"
    heavy = await client.post("/embed", json={"text": "hello"})
    assert heavy.status_code == 200, heavy.text
    assert heavy.json()["served_by"] == "heavy" and len(heavy.json()["vector"]) == 8


async def test_a_worker_killed_under_a_request_falls_back_to_the_other_pool(
    service: tuple[Pools, httpx.AsyncClient],
) -> None:
    front, client = service
    fast = front["fast"]
    request = asyncio.create_task(client.post("/summarize", json={"text": "x " * 200}))
    for _ in range(1000):  # until the request is on a fast worker (bounded)
        if fast.stats().inflight:
            break
        await asyncio.sleep(0.005)
    assert fast.stats().inflight == 1
    for worker in fast.status().workers:
        if worker.pid is not None and worker.inflight:
            os.kill(worker.pid, signal.SIGKILL)
    response = await request
    assert response.status_code == 200, response.text
    assert response.json()["served_by"] == "heavy"
    assert front.stats().routes["fast"].fallbacks == 1


async def test_the_routing_page_and_its_json_are_mounted(
    service: tuple[Pools, httpx.AsyncClient],
) -> None:
    _, client = service
    page = await client.get("/corral/routing/")
    assert page.status_code == 200 and "corral · routing" in page.text
    body = (await client.get("/corral/routing/routing.json")).json()
    assert [p["name"] for p in body["pools"]] == ["fast", "heavy"]
    assert {p["breaker"] for p in body["pools"]} == {"closed"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and set(ready.json()["pools"]) == {"fast", "heavy"}


async def test_an_open_breaker_answers_503_with_retry_after() -> None:
    async with running_service() as (front, client):
        for name in ("fast", "heavy"):  # both breakers open: nowhere to go
            breaker = front.breakers()[name]
            for _ in range(breaker.config.min_calls):
                breaker.record(time.monotonic(), True)  # the front's clock
        response = await client.post("/summarize", json={"text": "hi"})
        assert response.status_code == 503
        assert response.json()["tried"] == {"fast": "CircuitOpen", "heavy": "CircuitOpen"}
        assert response.headers["Retry-After"] == "1"
