"""`AsyncClient` against a real worker: every operation, and a thousand waits in one loop."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest
import redis

from producer import AsyncClient, SubmitRequest, UnknownTaskId
from vision_queue.errors import InvalidInput
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(600)


class StallMonitor:
    """Sleeps 10 ms again and again and records how late it wakes: the loop's longest stall.

    A stall is work the loop did instead of waking the monitor, so it counts the lateness
    only as far as the loop's thread spent CPU meanwhile: time the OS gave to other
    processes on a busy machine is not the client's stall.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_wall = 0.0
        self._running = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            planned, cpu = loop.time() + 0.01, time.thread_time()
            await asyncio.sleep(0.01)
            late = loop.time() - planned
            self.worst_wall = max(self.worst_wall, late)
            self.worst = max(self.worst, min(late, time.thread_time() - cpu))

    def stop(self) -> None:
        self._running = False


def test_a_thousand_concurrent_waits_never_stall_the_loop(
    client_settings: Settings, shared_worker, module_redis
) -> None:
    # pytest's own objects (hundreds of thousands) make one full garbage collection take
    # ~100 ms here; a latency-minded service freezes its startup heap, and so does the test,
    # leaving the client's own objects to collect.
    gc.collect()
    gc.freeze()

    async def scenario() -> tuple[list[dict | None], float, float, float]:
        async with AsyncClient(client_settings) as client:
            requests = [
                SubmitRequest("ask", [], f"Say {i}.", max_new_tokens=1) for i in range(1000)
            ]
            handles = await client.submit_many(requests)
            monitor = StallMonitor()
            watching = asyncio.create_task(monitor.run())
            await asyncio.sleep(0.05)
            began = time.monotonic()
            waits = []
            for start in range(0, len(handles), 100):
                # Waits begin as requests arrive, 100 per turn of the loop: starting 1,000
                # coroutines in one turn costs asyncio itself ~20 ms on this machine before
                # any client code runs. All 1,000 are then waiting at the same time.
                waits += [
                    asyncio.create_task(client.result(h.id, wait=True, timeout=300))
                    for h in handles[start : start + 100]
                ]
                await asyncio.sleep(0)
            results = await asyncio.gather(*waits)
            elapsed = time.monotonic() - began
            monitor.stop()
            await watching
            return results, monitor.worst, monitor.worst_wall, elapsed

    try:
        results, worst, worst_wall, elapsed = asyncio.run(scenario())
    finally:
        gc.unfreeze()
    assert [r["state"] if r else None for r in results] == ["SUCCESS"] * 1000
    print(
        f"\nasync: 1000 concurrent waits done in {elapsed:.1f}s, worst loop stall "
        f"{worst * 1e3:.1f} ms ({worst_wall * 1e3:.1f} ms wall, other processes included)"
    )
    assert worst < 0.05
    admin = module_redis.client()
    deadline = time.monotonic() + 30
    while admin.pubsub_channels("celery-task-meta-*"):
        assert time.monotonic() < deadline, "subscriptions left behind"
        time.sleep(0.05)


def test_every_operation_of_the_sync_client_exists_as_a_coroutine(
    client_settings: Settings, shared_worker, images: Path
) -> None:
    async def scenario() -> None:
        async with AsyncClient(client_settings) as client:
            handle = await client.submit("describe", [images / "small_400x300.jpg"])
            assert (await client.status(handle.id)).id == handle.id
            result = await client.result(handle.id, wait=True, timeout=120)
            assert result is not None and result["state"] == "SUCCESS"
            assert result["worker"] == shared_worker.name
            assert (await client.status(handle.id)).state == "SUCCESS"
            assert await client.result(handle.id) == result
            with pytest.raises(UnknownTaskId):
                await client.status("00000000-0000-4000-8000-000000000000")
            with pytest.raises(UnknownTaskId):
                await client.cancel("not-an-id")
            with pytest.raises(InvalidInput) as error:
                await client.submit("compare", [images / "small_400x300.jpg"])
            assert error.value.field == "images"

    asyncio.run(scenario())


def test_cancel_from_asyncio_keeps_the_text_so_far(module_redis, shared_worker) -> None:
    settings = Settings.from_env({}, redis_url=module_redis.url, max_new_tokens_caps="ask=64")

    async def scenario() -> tuple[dict, str]:
        async with AsyncClient(settings) as client:
            handle = await client.submit("ask", [], "Tell a long story.", max_new_tokens=64)
            pieces: list[str] = []
            async for event in client.stream_events(handle.id):
                if event.kind == "delta":
                    pieces.append(event.text)
                    if len(pieces) == 1:
                        await client.cancel(handle.id)
                else:
                    assert event.result is not None
                    return event.result, "".join(pieces)
            raise AssertionError("the stream never ended")

    result, streamed = asyncio.run(scenario())
    # The worker's cap is 64 tokens: it may finish before the cancel lands.
    if result["state"] == "FAILURE":
        assert result["error"]["code"] == "cancelled"
        assert result["finish_reason"] == "cancelled"
    assert result["text"] == streamed


def test_a_pending_wait_does_not_hold_a_connection_per_wait(client_settings, module_redis):
    # 200 waits on tasks no worker runs (their queue has no consumer): one pub/sub
    # connection and a bounded pool, whatever the number of waits.
    settings = Settings.from_env({}, redis_url=client_settings.redis_url, queue="nobody")
    admin: redis.Redis = module_redis.client()

    async def scenario() -> int:
        async with AsyncClient(settings) as client:
            handles = await client.submit_many(
                [SubmitRequest("ask", [], f"{i}") for i in range(200)]
            )
            waits = [
                asyncio.create_task(client.result(h.id, wait=True, timeout=30)) for h in handles
            ]
            await asyncio.sleep(1.0)
            connections = len(admin.client_list())
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            return connections

    assert asyncio.run(scenario()) < 40
    admin.delete("nobody")
