"""corral.asgi.status_app: the status page and its JSON, served over ASGI with httpx.

The browser test (tests/browser/) checks that the page renders and updates;
these check what the server sends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from corral import Pool
from corral.asgi import pool_lifespan, status_app

TARGET = "tests.workers.basic:app"


@contextlib.asynccontextmanager
async def client_of(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        yield client


async def test_status_json_shows_the_workers_of_the_given_pool() -> None:
    async with Pool(TARGET, size=2, name="direct") as pool, client_of(status_app(pool)) as client:
        await pool.call("add", 1, 2)
        response = await client.get("/status.json")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["pool"] == "direct" and body["state"] == "open"
        assert sorted(w["pid"] for w in body["workers"]) == sorted(w.pid for w in pool.workers)
        assert all(w["rss"] > 0 for w in body["workers"])
        assert sum(w["calls_served"] for w in body["workers"]) == 1


async def test_the_page_is_one_self_contained_document() -> None:
    async with Pool(TARGET, size=1) as pool, client_of(status_app(pool, interval=0.5)) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert page.startswith("<!doctype html>")
    assert "<script>" in page and "<style>" in page
    assert 'data-interval="500"' in page
    # nothing from elsewhere: no absolute URL, no external script, style or font
    assert not re.search(r"(src|href)\s*=", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page


async def test_mounted_under_a_prefix_it_finds_the_pool_in_the_lifespan_state() -> None:
    app = Starlette(
        routes=[Mount("/corral", status_app())],
        lifespan=pool_lifespan(lambda: Pool(TARGET, size=1, name="from-state")),
    )
    async with client_of(app) as client:
        page = await client.get("/corral/")
        assert 'data-base="/corral"' in page.text
        body = (await client.get("/corral/status.json")).json()
        assert body["pool"] == "from-state" and len(body["workers"]) == 1


async def test_a_named_pool_is_picked_from_several() -> None:
    app = Starlette(
        routes=[Mount("/status", status_app(name="second"))],
        lifespan=pool_lifespan(
            lambda: Pool(TARGET, size=1, name="first"), lambda: Pool(TARGET, size=1, name="second")
        ),
    )
    async with client_of(app) as client:
        assert (await client.get("/status/status.json")).json()["pool"] == "second"


async def test_without_a_pool_the_json_says_why_with_a_503() -> None:
    app = Starlette(routes=[Mount("/corral", status_app())])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.get("/corral/status.json")
    assert response.status_code == 503
    assert "no corral pool" in response.json()["error"]


async def test_an_eviction_shows_in_the_json() -> None:
    async with Pool(TARGET, size=1) as pool, client_of(status_app(pool)) as client:
        victim = pool.workers[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert await pool._wait_until(lambda: len(pool.status().evictions) == 1, 10)
        await pool.wait_ready(timeout=10)
        body = (await client.get("/status.json")).json()
    (eviction,) = body["evictions"]
    assert eviction["pid"] == victim and eviction["reason"] == "signal SIGKILL"
    assert [w["pid"] for w in body["workers"]] != [victim]


async def test_a_closed_pool_is_reported_not_an_error() -> None:
    pool = Pool(TARGET, size=1)
    async with pool:
        pass
    async with client_of(status_app(pool)) as client:
        body = (await client.get("/status.json")).json()
    assert body["state"] == "closed" and body["workers"] == []


def test_the_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match=r"corral\.Pool"):
        status_app("not a pool")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval"):
        status_app(interval=0)
    with pytest.raises(ValueError, match="not both"):
        status_app(Pool(TARGET), name="x")
