"""The FastAPI example service (examples/fastapi_app), run through its real lifespan.

Each test starts the application with ``LifespanManager`` (which runs the
lifespan, so the pool starts with real worker processes) and talks to it with
``httpx.AsyncClient`` over ``httpx.ASGITransport``: no server, no port.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psutil
import pytest
from asgi_lifespan import LifespanManager
from examples.fastapi_app.app import app

# Starting real workers may take a while on a loaded machine; asgi-lifespan's
# default is 5 s.
LIFESPAN_TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def running_service() -> AsyncIterator[tuple[LifespanManager, httpx.AsyncClient]]:
    async with (
        LifespanManager(
            app, startup_timeout=LIFESPAN_TIMEOUT, shutdown_timeout=LIFESPAN_TIMEOUT
        ) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://example.test"
        ) as client,
    ):
        yield manager, client


def still_running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone (and reaped) between two looks
        return False


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with running_service() as (_, client):
        yield client


async def test_add_is_a_plain_call(client: httpx.AsyncClient) -> None:
    response = await client.post("/add", json={"a": 2, "b": 3.5})
    assert response.status_code == 200
    assert response.json() == {"result": 5.5}


async def test_each_user_has_a_history_of_their_own(client: httpx.AsyncClient) -> None:
    async def say(user: str, message: str) -> dict[str, object]:
        response = await client.post("/chat", json={"message": message}, headers={"X-User": user})
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    await say("alice", "hello")
    await say("bob", "hi there")
    alice = await say("alice", "how are you?")
    bob = await say("bob", "bye")
    assert alice["history"] == ["hello", "how are you?"]
    assert bob["history"] == ["hi there", "bye"]
    assert alice["reply"] == "message 2 received: how are you?"


async def test_forgetting_a_history_starts_it_afresh(client: httpx.AsyncClient) -> None:
    alice = {"X-User": "alice"}
    await client.post("/chat", json={"message": "one"}, headers=alice)
    assert (await client.delete("/chat", headers=alice)).status_code == 204
    response = await client.post("/chat", json={"message": "two"}, headers=alice)
    assert response.json()["history"] == ["two"]


async def test_chat_without_a_user_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat", json={"message": "who am I?"})
    assert response.status_code == 422


async def test_stream_returns_every_word_in_order(client: httpx.AsyncClient) -> None:
    words = [f"word{i}" for i in range(100)]  # more than one stream window (32)
    async with client.stream("GET", "/stream", params={"text": " ".join(words)}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        body = "".join([chunk async for chunk in response.aiter_text()])
    assert body.splitlines() == words


async def test_stream_delay_sends_each_word_as_the_worker_yields_it() -> None:
    """``delay`` makes the stream visible (curl -N shows the words one by one): each
    word is its own body message, sent as it comes, and the delays add up."""
    async with running_service() as (manager, client):
        for bad in (-1, 3, "soon"):
            refused = await client.get("/stream", params={"text": "a", "delay": bad})
            assert refused.status_code == 422, bad
        chunks: list[bytes] = []
        done = asyncio.Event()
        request_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.append(message["body"])
                if not message.get("more_body", False):
                    done.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/stream",
            "raw_path": b"/stream",
            "root_path": "",
            "query_string": b"text=the+quick+brown+fox&delay=0.1",
            "headers": [(b"host", b"example.test")],
            "client": ("127.0.0.1", 50000),
            "server": ("example.test", 80),
        }
        began = time.monotonic()
        await asyncio.wait_for(manager.app(scope, receive, send), 30)
        elapsed = time.monotonic() - began
    assert chunks == [b"the\n", b"quick\n", b"brown\n", b"fox\n"]
    assert elapsed >= 4 * 0.1  # a lower bound: it holds on any machine


async def test_probes_say_alive_and_ready_once_started(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    assert live.status_code == 200
    assert live.json() == {"status": "alive"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    stats = body["pools"]["example"]
    assert stats["ready"] == stats["size"] == 2
    assert stats["failed"] is False and stats["closed"] is False


async def test_the_status_page_is_mounted_at_corral(client: httpx.AsyncClient) -> None:
    await client.post("/chat", json={"message": "hi"}, headers={"X-User": "alice"})
    page = await client.get("/corral/")
    assert page.status_code == 200 and 'data-base="/corral"' in page.text
    body = (await client.get("/corral/status.json")).json()
    assert body["pool"] == "example" and body["state"] == "open"
    assert len(body["workers"]) == 2 and all(w["pid"] for w in body["workers"])
    assert sum(w["sessions"] for w in body["workers"]) == 1


async def test_after_shutdown_probes_fail_and_no_worker_is_left() -> None:
    me = psutil.Process()
    async with running_service() as (manager, client):
        assert (await client.get("/health/ready")).status_code == 200
        workers = me.children(recursive=True)  # the workers and their shepherds
        assert len(workers) >= 2
    assert not [p for p in workers if still_running(p)]
    # The lifespan is over: the pool is closed, and the probes say so.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=manager.app), base_url="http://example.test"
    ) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert ready.json()["pools"]["example"]["closed"] is True
        assert ready.json()["pools"]["example"]["ready"] == 0
        assert (await client.get("/health/live")).status_code == 503
        refused = await client.post("/add", json={"a": 1, "b": 1})
        assert refused.status_code == 503
        assert refused.json() == {"error": "PoolClosed"}
