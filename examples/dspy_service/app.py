"""A FastAPI front for DSPy programs run by a corral pool (workers: ``worker.py`` here).

Run it with ``uvicorn examples.dspy_service.app:app`` from the repository root.
The pool starts in the lifespan (``pool_lifespan``), never at import. Each
user (header ``X-User``) has a session: the programs they build live in the
worker holding it.

    PUT    /programs/{name}         {"signature": "...", "kind": "predict"}  build
    GET    /programs                the user's programs
    POST   /programs/{name}         {"inputs": {...}}          run: the outputs
    POST   /programs/{name}/stream  {"inputs": {...}}          NDJSON: deltas, then outputs
    DELETE /session                 forget the user's programs
    GET    /health/live, /health/ready

A worker that dies takes its sessions with it: the user's next request gets 409
(``SessionLost``), then 404 (``ProgramNotFound``) until the program is built again.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import corral
from corral import Pool
from corral.asgi import CallStreamResponse, get_pool, health_routes, ndjson, pool_lifespan
from corral.asgi import stream_response as ndjson_response

WORKER_TARGET = "examples.dspy_service.worker:app"


def make_pool() -> Pool:
    """Called by the lifespan at startup. The workers read ``DSPY_SERVICE_*`` themselves."""
    return Pool(
        WORKER_TARGET,
        name="dspy",
        size=int(os.environ.get("DSPY_SERVICE_WORKERS", "2")),
        startup_timeout=120.0,  # each worker imports DSPy before it is ready
        call_timeout=120.0,  # a real LM can be slow; the dummy answers at once
        max_waiting=100,
    )


app = FastAPI(title="DSPy programs on corral", lifespan=pool_lifespan(make_pool))
app.router.routes.extend(health_routes())

PoolDep = Annotated[Pool, Depends(get_pool)]
UserHeader = Annotated[str, Header(description="who is calling; keys the session")]


def _session(user: str) -> str:
    # Trusting a header is for the example only: derive the session from the
    # authenticated caller, so that no one reaches another's programs.
    return f"user:{user}"


class BuildIn(BaseModel):
    signature: str
    kind: str = "predict"
    instructions: str | None = None


class RunIn(BaseModel):
    inputs: dict[str, Any]
    field: str | None = None  # for /stream: the output to stream (default: the answer)


@app.put("/programs/{name}")
async def build(name: str, body: BuildIn, pool: PoolDep, x_user: UserHeader) -> dict[str, Any]:
    description: dict[str, Any] = await pool.call(
        "build", name, body.signature, body.kind, body.instructions, session=_session(x_user)
    )
    return description


@app.get("/programs")
async def programs(pool: PoolDep, x_user: UserHeader) -> dict[str, Any]:
    held: dict[str, Any] = await pool.call("programs", session=_session(x_user))
    return held


@app.post("/programs/{name}")
async def run(name: str, body: RunIn, pool: PoolDep, x_user: UserHeader) -> dict[str, Any]:
    result: dict[str, Any] = await pool.call("run", name, body.inputs, session=_session(x_user))
    return result


@app.post("/programs/{name}/stream")
async def stream(name: str, body: RunIn, pool: PoolDep, x_user: UserHeader) -> CallStreamResponse:
    # One JSON object per line: {"delta": "..."} as the answer is produced, then
    # {"field": ..., "outputs": {...}, "calls": n}. A client that leaves cancels it.
    items = pool.stream("stream", name, body.inputs, body.field, session=_session(x_user))
    return ndjson_response(items, media_type="application/x-ndjson", encode=ndjson)


@app.delete("/session", status_code=204)
async def forget(pool: PoolDep, x_user: UserHeader) -> None:
    await pool.close_session(_session(x_user))


# The worker's own errors, by exception name: their messages are written for the caller.
_REMOTE_STATUS = {"ProgramNotFound": 404, "SignatureError": 422, "InputError": 422}
_STATUS: list[tuple[type[corral.CorralError], int]] = [
    (corral.SessionLost, 409),  # the worker holding the programs died: build them again
    (corral.CallTimeout, 504),
    (corral.PoolOverloaded, 503),
    (corral.PoolTimeout, 503),
    (corral.PoolFailed, 503),
    (corral.PoolClosed, 503),
]


@app.exception_handler(corral.CorralError)
async def corral_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, corral.RemoteError):
        kind = exc.type.rpartition(".")[2]
        if kind in _REMOTE_STATUS:
            return JSONResponse(
                {"error": kind, "detail": exc.message}, status_code=_REMOTE_STATUS[kind]
            )
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 502)
    # Otherwise the type only: a handler's message may say more than a client should see.
    return JSONResponse({"error": type(exc).__name__}, status_code=status)
