"""What every request of one gateway process shares: connections, keys, limits, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import anyio
from fastapi import Depends, Request

from producer.gateway.auth import Caller, KeyRing
from producer.gateway.limits import Limiter
from producer.gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    import redis.asyncio

    from producer.async_client import AsyncClient
    from vision_queue.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    client: AsyncClient
    redis: redis.asyncio.Redis
    keys: KeyRing
    limiter: Limiter
    metrics: GatewayMetrics
    # Chat `file` PDFs drawn at once (VQ_DOCUMENT_RENDERS): each draw is a child
    # process of up to VQ_DOCUMENT_PAGE_MEMORY_BYTES, so this bounds the gateway's memory.
    document_renders: anyio.CapacityLimiter
    # need_worker -> (when, status, body) of the last readiness probe (health.py)
    readiness: dict[bool, tuple[float, int, bytes]] = field(default_factory=dict)


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def caller(request: Request) -> Caller:
    """FastAPI dependency of every /v1 route: a valid key, within its request rate."""
    state = state_of(request)
    known = request.scope.get("state", {}).get("caller")  # the door checked the key
    who = known if isinstance(known, Caller) else state.keys.authenticate(request)
    await state.limiter.check_rate(who.key_id)
    return who


Authorized = Annotated[Caller, Depends(caller)]
