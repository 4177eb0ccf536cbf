"""Waits are pushed by Redis, not polled, and leave nothing behind on the server.

Results here are stored by a real Celery Redis backend of the same app (what Celery
itself PUBLISHes on `celery-task-meta-<id>`), on a real redis-server; the queue is one no
worker consumes, so only the waiting is under test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from support.redis_server import RedisServer

import producer.async_client
import producer.client
from producer import AsyncClient, Client, SubmitRequest, TaskStatus
from vision_queue.celery_config import make_celery_app
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, queue="nobody", connect_timeout_s=5.0)


@pytest.fixture
def backend(settings: Settings):
    app = make_celery_app(settings)
    yield app.backend
    app.close()


@pytest.fixture
def no_backup_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wait that returns at all must have been woken by a PUBLISH."""
    monkeypatch.setattr(producer.client, "BACKUP_POLL_S", 3600.0)
    monkeypatch.setattr(producer.async_client, "BACKUP_POLL_S", 3600.0)


def subscribed(redis_url: str, task_id: str) -> bool:
    channel = f"celery-task-meta-{task_id}"
    with redis.Redis.from_url(redis_url) as admin:
        return dict(admin.pubsub_numsub(channel)).get(channel.encode(), 0) > 0


def wait_until(check, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_wait_is_woken_by_the_stored_result(redis_url, settings, backend, no_backup_poll):
    with Client(settings) as client:
        handle = client.submit("ask", [], "Hi")
        seen: list[TaskStatus] = []
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.result, handle.id, True, 60, seen.append)
            wait_until(lambda: subscribed(redis_url, handle.id))
            backend.store_result(handle.id, {"tokens": 3}, "PROGRESS")
            backend.store_result(handle.id, {"id": handle.id, "text": "hé"}, "SUCCESS")
            result = waiting.result(timeout=60)
    assert result == {"id": handle.id, "text": "hé", "state": "SUCCESS"}
    assert [s.state for s in seen] == ["PENDING", "PROGRESS", "SUCCESS"]
    assert seen[1].tokens == 3


def test_a_result_stored_before_the_wait_began_is_returned_at_once(
    settings, backend, no_backup_poll
):
    with Client(settings) as client:
        handle = client.submit("ask", [], "Hi")
        backend.store_result(handle.id, {"id": handle.id, "text": "done"}, "SUCCESS")
        assert client.result(handle.id, wait=True, timeout=60)["text"] == "done"


def test_the_async_client_is_woken_too(redis_url, settings, backend, no_backup_poll):
    async def scenario() -> dict:
        async with AsyncClient(settings) as client:
            handle = await client.submit("ask", [], "Hi")
            waiting = asyncio.create_task(client.result(handle.id, wait=True, timeout=60))
            while not subscribed(redis_url, handle.id):
                await asyncio.sleep(0.01)
            await asyncio.to_thread(backend.store_result, handle.id, {"id": handle.id}, "SUCCESS")
            return await waiting

    assert asyncio.run(scenario())["state"] == "SUCCESS"


def test_ten_thousand_submits_and_waits_leave_no_subscription_or_connection(
    redis_url: str, settings: Settings, backend
):
    admin = redis.Redis.from_url(redis_url)

    def client_count() -> int:
        return len(admin.client_list())

    backend.client.ping()  # the backend's own connection exists before counting
    start = client_count()
    total, threads = 10_000, 16
    with Client(settings) as client:
        handles = client.submit_many([SubmitRequest("ask", [], f"Say {i}.") for i in range(total)])
        stored = threading.Event()

        def complete() -> None:
            # Half the results exist before their wait starts, half arrive while it waits.
            for handle in handles[::2]:
                backend.store_result(handle.id, {"id": handle.id}, "SUCCESS")
            stored.set()
            for handle in handles[1::2]:
                backend.store_result(handle.id, {"id": handle.id}, "SUCCESS")

        completer = threading.Thread(target=complete)
        completer.start()
        peak = 0
        with ThreadPoolExecutor(threads) as pool:
            stored.wait(120)
            results = pool.map(lambda h: client.result(h.id, wait=True, timeout=300), handles)
            states = []
            for result in results:
                states.append((result or {}).get("state"))
                if len(states) % 1000 == 0:
                    peak = max(peak, client_count())
        completer.join()
        assert states == ["SUCCESS"] * total
        # Bounded while open: the pools' connections and one pub/sub connection at most.
        assert peak <= start + 2 * producer.client.POOL_SIZE + 1
        # Every channel was unsubscribed (asynchronously, right after its wait).
        wait_until(lambda: not admin.pubsub_channels("celery-task-meta-*"))
        assert admin.pubsub_numsub(*[f"celery-task-meta-{h.id}" for h in handles[:50]]) == [
            (f"celery-task-meta-{h.id}".encode(), 0) for h in handles[:50]
        ]
    wait_until(lambda: client_count() <= start)


def test_a_wait_survives_a_redis_restart(
    redis_server: RedisServer, redis_url, settings, backend, no_backup_poll
):
    with Client(settings) as client:
        handle = client.submit("ask", [], "Hi")
        with ThreadPoolExecutor(1) as pool:
            # Woken by the PUBLISH on the new connection: no backup poll, no wait timeout.
            waiting = pool.submit(client.result, handle.id, True, 3600)
            wait_until(lambda: subscribed(redis_url, handle.id))
            redis_server.restart()  # AOF on: the submitted task survives
            wait_until(lambda: subscribed(redis_url, handle.id))  # re-subscribed by itself
            backend.store_result(handle.id, {"id": handle.id}, "SUCCESS")
            assert waiting.result(timeout=120)["state"] == "SUCCESS"
