"""A FastAPI service with two pools behind one corral front: "fast" and "heavy".

Run it with ``uvicorn examples.routed_service.app:app`` from the repository root.
Both pools serve the same worker app (examples/routed_service/worker.py); a
rule sends ``embed`` to the heavy pool and everything else to the fast one, and
each falls back on the other when it refuses work (overloaded, failed, its
circuit breaker open) or, since both handlers are idempotent, when a worker
dies under a call.

    POST /summarize   {"text": "..."}    -> {"summary", "served_by"}   (fast, else heavy)
    POST /embed       {"text": "..."}    -> {"vector", "served_by"}    (heavy, else fast)
    GET  /health/live, /health/ready      liveness and readiness probes
    GET  /corral/routing/                 the front's live page: pools, breakers, charts
    GET  /corral/                         the fast pool's worker-by-worker status page

Every response says which pool served it (``served_by``, and the
``X-Served-By`` header); when every pool refused, the answer is a 503 with
``Retry-After``.
"""

from __future__ import annotations

import math
import os
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import corral
from corral import BreakerConfig, Pool, Pools, Rule, Workload
from corral.asgi import front_lifespan, get_front, health_routes, routing_status_app, status_app

WORKER_TARGET = "examples.routed_service.worker:app"


def make_front() -> Pools:
    """Called by the lifespan at startup, never at import."""
    fast = Pool(
        WORKER_TARGET,
        name="fast",
        size=int(os.environ.get("EXAMPLE_FAST_WORKERS", "2")),
        call_timeout=5.0,
        max_waiting=16,  # shed to the fallback rather than queue behind a burst
    )
    heavy = Pool(
        WORKER_TARGET,
        name="heavy",
        size=int(os.environ.get("EXAMPLE_HEAVY_WORKERS", "1")),
        call_timeout=30.0,
        max_waiting=64,
    )
    return Pools(
        fast,
        heavy,
        workloads={
            "fast": Workload(["fast", "heavy"], idempotent=True),
            "heavy": Workload(["heavy", "fast"], idempotent=True, retries=1),
        },
        rules=[Rule("heavy", methods=["embed"])],
        default="fast",
        breaker=BreakerConfig(failure_rate=0.5, min_calls=10, cooldown=5.0),
    )


app = FastAPI(title="corral routed example", lifespan=front_lifespan(make_front))
app.router.routes.extend(health_routes())
# Operators' pages: they show pids and error reasons, mount them out of the public's reach.
app.mount("/corral/routing", routing_status_app())
app.mount("/corral", status_app())

FrontDep = Annotated[Pools, Depends(get_front)]


class TextIn(BaseModel):
    text: str


class SummaryOut(BaseModel):
    summary: str
    served_by: str


class EmbeddingOut(BaseModel):
    vector: list[float]
    served_by: str


@app.post("/summarize")
async def summarize(body: TextIn, front: FrontDep) -> JSONResponse:
    routed = await front.call_routed("summarize", body.text, timeout=10.0)
    out = SummaryOut(summary=routed.value["summary"], served_by=routed.pool)
    return JSONResponse(out.model_dump(), headers={"X-Served-By": routed.pool})


@app.post("/embed")
async def embed(body: TextIn, front: FrontDep) -> JSONResponse:
    routed = await front.call_routed("embed", body.text, timeout=30.0)
    out = EmbeddingOut(vector=routed.value["vector"], served_by=routed.pool)
    return JSONResponse(out.model_dump(), headers={"X-Served-By": routed.pool})


@app.exception_handler(corral.CircuitOpen)
async def circuit_open(request: Request, exc: corral.CircuitOpen) -> JSONResponse:
    retry = max(1, math.ceil(exc.retry_after))
    return JSONResponse(
        {"error": f"pool {exc.pool} is resting after failures"},
        status_code=503,
        headers={"Retry-After": str(retry)},
    )


@app.exception_handler(corral.AllPoolsFailed)
async def all_pools_failed(request: Request, exc: corral.AllPoolsFailed) -> JSONResponse:
    tried = {pool: type(error).__name__ for pool, error in exc.attempts}
    return JSONResponse(
        {"error": "no pool could serve the request", "tried": tried},
        status_code=503,
        headers={"Retry-After": "1"},
    )


@app.exception_handler(corral.PoolOverloaded)
async def overloaded(request: Request, exc: corral.PoolOverloaded) -> JSONResponse:
    return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "1"})
