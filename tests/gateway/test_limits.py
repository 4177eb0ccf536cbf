"""Per-key limits live in Redis: several gateway processes see one budget per key."""

from __future__ import annotations

import asyncio
from typing import Any

from producer.gateway.errors import ApiError
from producer.gateway.limits import Limiter
from vision_queue.redis_connect import async_redis_client
from vision_queue.settings import Settings


def limiters(redis_url: str, count: int, **changes: Any) -> list[Limiter]:
    """`count` limiters on separate connections, as separate gateway processes have."""
    settings = Settings.from_env({}, redis_url=redis_url, **changes)
    return [Limiter(async_redis_client(settings), settings) for _ in range(count)]


async def refusal(call: Any) -> ApiError | None:
    try:
        await call
    except ApiError as error:
        return error
    return None


def test_the_request_rate_is_shared_by_every_gateway(redis_url: str):
    async def scenario() -> None:
        # Given two gateways, a rate of 60 a minute and bursts of 4,
        one, two = limiters(redis_url, 2, gateway_requests_per_minute=60, gateway_request_burst=4)
        # when a key sends 4 requests through them in turn, all pass;
        for limiter in (one, two, one, two):
            assert await refusal(limiter.check_rate("key-a")) is None
        # the fifth, through either, is refused with a Retry-After of about a second,
        error = await refusal(two.check_rate("key-a"))
        assert error is not None and error.status == 429
        assert error.code == "rate_limit_exceeded"
        assert error.headers["Retry-After"] == "1"
        # while another key still has its own full budget.
        assert await refusal(one.check_rate("key-b")) is None

    asyncio.run(scenario())


def test_no_rate_limit_when_it_is_zero(redis_url: str):
    async def scenario() -> None:
        (limiter,) = limiters(redis_url, 1, gateway_requests_per_minute=0)
        for _ in range(200):
            await limiter.check_rate("key-a")

    asyncio.run(scenario())


def test_concurrent_submissions_never_take_more_slots_than_the_limit(redis_url: str):
    async def scenario() -> None:
        # Given a limit of 3 unfinished tasks and three gateways,
        gateways = limiters(redis_url, 3, gateway_max_tasks_per_key=3)
        # when 12 submissions race for slots at once,
        outcomes = await asyncio.gather(
            *(gateways[i % 3].reserve_task("key-a") for i in range(12)), return_exceptions=True
        )
        # then exactly 3 get one and the rest are told to retry later.
        taken = [o for o in outcomes if isinstance(o, str)]
        refused = [o for o in outcomes if isinstance(o, ApiError)]
        assert len(taken) == 3 and len(refused) == 9
        assert {r.code for r in refused} == {"too_many_tasks"}
        assert all(int(r.headers["Retry-After"]) > 0 for r in refused)
        # A task that ends frees its slot for the next submission.
        await gateways[0].bind_task("key-a", taken[0], "task-1")
        await gateways[1].release("key-a", "task-1")
        assert isinstance(await gateways[2].reserve_task("key-a"), str)

    asyncio.run(scenario())
