"""Probes and metrics, without an API key: they reveal no task and no caller.

* `/healthz`: the process answers (liveness).
* `/readyz`: Redis answers, accepts writes (a full Redis is named as such, not as an
  unreachable one) and at least one worker is alive on the queue (readiness): a gateway
  that cannot get work done should leave the load balancer's rotation.
* `/readyz/redis`: Redis answers, workers or not (readiness where workers scale from zero
  on the queue's length, as with KEDA: requests must be queued to wake them).
* `/metrics`: Prometheus exposition of this process's request counters.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from producer.gateway.state import state_of
from vision_queue.presence import live_workers_async
from vision_queue.protocol import KEY_PREFIX

router = APIRouter(tags=["Operations"])
# Written (and expiring) by every readiness probe: Redis refuses it when out of memory.
PROBE_KEY = KEY_PREFIX + ":gw:ready-probe"
READY_CACHE_S = 1.0


class Readiness(BaseModel):
    queue: str
    status: Literal["ready", "unready"]
    workers: int | None = Field(None, description="Live workers on the queue.")
    reason: str | None = Field(None, description="Why not ready.")


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable and a worker alive on the queue",
    response_model=Readiness,
    responses={503: {"description": "Not ready; `reason` says why.", "model": Readiness}},
)
async def readyz(request: Request) -> Response:
    return await _readiness(request, need_worker=True)


@router.get(
    "/readyz/redis",
    summary="Readiness without workers: Redis reachable, so requests can be queued",
    response_model=Readiness,
    responses={503: {"description": "Not ready; `reason` says why.", "model": Readiness}},
)
async def readyz_redis(request: Request) -> Response:
    return await _readiness(request, need_worker=False)


async def _readiness(request: Request, need_worker: bool) -> Response:
    """The verdict, computed at most once per READY_CACHE_S per process: the probes need
    no key, so a flood of them must not become a flood of Redis commands."""
    cache = state_of(request).readiness
    cached = cache.get(need_worker)
    if cached is None or time.monotonic() - cached[0] >= READY_CACHE_S:
        answer = await _probe(request, need_worker)
        cached = (time.monotonic(), answer.status_code, bytes(answer.body))
        cache[need_worker] = cached
    return Response(cached[2], status_code=cached[1], media_type="application/json")


async def _probe(request: Request, need_worker: bool) -> JSONResponse:
    state = state_of(request)
    queue = state.settings.queue
    body: dict[str, Any] = {"queue": queue}
    try:
        await state.redis.ping()
        workers = await live_workers_async(state.redis, queue)
        await state.redis.set(PROBE_KEY, b"1", px=5000)
    except redis.OutOfMemoryError:
        reason = "Redis is out of memory (maxmemory reached): new tasks are refused"
        return JSONResponse({**body, "status": "unready", "reason": reason}, status_code=503)
    except (redis.RedisError, OSError) as exc:
        reason = "Redis refused the password" if _is_auth(exc) else "Redis is unreachable"
        return JSONResponse({**body, "status": "unready", "reason": reason}, status_code=503)
    if need_worker and not workers:
        reason = f"no live worker on queue {queue}"
        return JSONResponse(
            {**body, "status": "unready", "reason": reason, "workers": 0}, status_code=503
        )
    return JSONResponse({**body, "status": "ready", "workers": len(workers)})


@router.get("/metrics", summary="Prometheus metrics of this process", include_in_schema=False)
async def metrics(request: Request) -> Response:
    exposition = state_of(request).metrics.exposition()
    return Response(exposition, media_type="text/plain; version=0.0.4")


def _is_auth(exc: BaseException) -> bool:
    return (
        isinstance(exc, redis.AuthenticationError)
        or "NOAUTH" in str(exc)
        or ("WRONGPASS" in str(exc))
    )
