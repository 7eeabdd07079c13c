"""A FastAPI service backed by a corral pool (workers in examples/fastapi_app/worker.py).

Run it with ``uvicorn examples.fastapi_app.app:app`` from the repository root.
The pool is built by ``make_pool`` inside the lifespan, in the serving process,
when the server starts: importing this module starts nothing.

    POST   /add            {"a": 1, "b": 2}      -> {"result": 3.0}
    POST   /chat           {"message": "hi"}     per-user history, header X-User
    DELETE /chat           forget X-User's history
    GET    /stream?text=a+b+c&delay=0.3          the words, one per line, as they come
    GET    /health/live, /health/ready           liveness and readiness probes
    GET    /corral/                              the pool's live status page
    GET    /corral/status.json                   the same, as JSON
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

import corral
from corral import Pool
from corral.asgi import get_pool, health_routes, pool_lifespan, status_app, stream_response

WORKER_TARGET = "examples.fastapi_app.worker:app"


def make_pool() -> Pool:
    """Called by the lifespan at startup, never at import (see docs/fastapi.md)."""
    return Pool(
        WORKER_TARGET,
        name="example",
        size=int(os.environ.get("EXAMPLE_WORKERS", "2")),
        call_timeout=10.0,  # the default deadline of every call: wait, wire and work
        max_waiting=100,  # past that, shed load at once (503) instead of queueing
    )


app = FastAPI(title="corral example", lifespan=pool_lifespan(make_pool))
app.router.routes.extend(health_routes())  # GET /health/live and /health/ready
# The pool's live status page. It shows pids and error reasons: in a real
# service, mount it where only operators can reach it.
app.mount("/corral", status_app())

PoolDep = Annotated[Pool, Depends(get_pool)]
UserHeader = Annotated[str, Header(description="who is chatting; keys the session")]


class AddIn(BaseModel):
    a: float
    b: float


class AddOut(BaseModel):
    result: float


class ChatIn(BaseModel):
    message: str


class ChatOut(BaseModel):
    reply: str
    history: list[str]
    worker_pid: int


def _session(user: str) -> str:
    # Trusting a header is fine for an example; a real service derives the
    # session from the authenticated identity, so no one can read another's.
    return f"user:{user}"


@app.post("/add")
async def add(body: AddIn, pool: PoolDep) -> AddOut:
    return AddOut(result=await pool.call("add", body.a, body.b, timeout=5.0))


@app.post("/chat")
async def chat(body: ChatIn, pool: PoolDep, x_user: UserHeader) -> ChatOut:
    result = await pool.call("chat", body.message, session=_session(x_user), timeout=5.0)
    return ChatOut(**result)


@app.delete("/chat", status_code=204)
async def forget(pool: PoolDep, x_user: UserHeader) -> None:
    await pool.close_session(_session(x_user))


def _line(word: Any) -> str:
    return f"{word}\n"


@app.get("/stream")
async def stream(
    text: str,
    pool: PoolDep,
    delay: Annotated[float, Query(ge=0, le=2, description="seconds before each word")] = 0.0,
) -> StreamingResponse:
    # The handler runs in a worker; if the client goes away, the response
    # closes the stream and the handler is cancelled there. ``delay`` spaces
    # the words, as a model's tokens are, so `curl -N` shows them arrive.
    return stream_response(
        pool.stream("words", text, delay, timeout=60.0), media_type="text/plain", encode=_line
    )


# corral's typed errors as HTTP statuses. The order matters: first match wins.
_STATUS: list[tuple[type[corral.CorralError], int]] = [
    (corral.SessionLost, 409),  # the worker holding the history died: start again
    (corral.CallTimeout, 504),
    (corral.PoolOverloaded, 503),
    (corral.PoolTimeout, 503),
    (corral.PoolFailed, 503),
    (corral.PoolClosed, 503),
]


@app.exception_handler(corral.CorralError)
async def corral_error(request: Request, exc: Exception) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 502)
    # The type only: a handler's message may say more than a client should see.
    return JSONResponse({"error": type(exc).__name__}, status_code=status)
