"""Worker presence: alive while announcing, gone once the announced expiry passes."""

from __future__ import annotations

import asyncio

from vision_queue.presence import announce, live_workers, live_workers_async, withdraw
from vision_queue.redis_connect import async_redis_client, redis_client
from vision_queue.settings import Settings


def test_a_worker_is_live_until_its_expiry_and_only_on_its_queues(redis_url: str) -> None:
    settings = Settings.from_env({}, redis_url=redis_url)
    client = redis_client(settings)
    announce(client, ["gpu", "gpu.high"], "w1@host", ttl_s=10, now=1000.0)
    announce(client, ["gpu"], "w2@host", ttl_s=30, now=1000.0)
    assert live_workers(client, "gpu", now=1005.0) == ["w1@host", "w2@host"]
    assert live_workers(client, "gpu.high", now=1005.0) == ["w1@host"]
    assert live_workers(client, "gpu", now=1011.0) == ["w2@host"]
    assert live_workers(client, "other", now=1005.0) == []


def test_a_stale_member_is_trimmed_by_the_next_announce(redis_url: str) -> None:
    client = redis_client(Settings.from_env({}, redis_url=redis_url))
    announce(client, ["gpu"], "dead@host", ttl_s=5, now=1000.0)
    announce(client, ["gpu"], "alive@host", ttl_s=5, now=2000.0)
    assert client.zcard("vq:presence:gpu") == 1


def test_withdraw_leaves_at_once_and_the_async_reader_agrees(redis_url: str) -> None:
    settings = Settings.from_env({}, redis_url=redis_url)
    client = redis_client(settings)
    announce(client, ["gpu"], "w1@host", ttl_s=60)
    announce(client, ["gpu"], "w2@host", ttl_s=60)
    withdraw(client, ["gpu"], "w1@host")

    async def read() -> list[str]:
        async_client = async_redis_client(settings)
        try:
            return await live_workers_async(async_client, "gpu")
        finally:
            await async_client.aclose()

    assert asyncio.run(read()) == live_workers(client, "gpu") == ["w2@host"]
