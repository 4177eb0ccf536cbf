"""Fixtures that own real processes: a redis-server per session, workers per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.http_server import IMAGE_HOST
from support.redis_server import RedisServer
from support.sentinel import SentinelCluster
from support.workers import IMAGES, WorkerProcess

from producer.client import Client
from vision_queue.settings import Settings

# The module worker may fetch from the tests' loopback server (its one port), and runs out
# of memory on purpose when a prompt carries the marker (VQ_FAULT_INJECTION, test-only).
SHARED_WORKER_ENV = {
    "VQ_ALLOWED_PRIVATE_HOSTS": IMAGE_HOST,
    "VQ_FAULT_INJECTION": "oom_marker=__OOM__",
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A flushed database on the session's redis-server."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a fault test may have stopped it
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own, for modules that keep one worker running."""
    with RedisServer(tmp_path_factory.mktemp("redis-module")) as server:
        yield server


@pytest.fixture(scope="session")
def sentinel_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    """A master, its replica and three sentinels (tests/support/sentinel.py). The failover
    test kills the master: use the sentinel URL, never a fixed server, after it."""
    with SentinelCluster(tmp_path_factory.mktemp("sentinel")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shared_worker(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        module_redis.url, tmp_path_factory.mktemp("worker"), **SHARED_WORKER_ENV
    ) as worker:
        yield worker


@pytest.fixture
def client_settings(module_redis: RedisServer) -> Settings:
    return Settings.from_env(
        {},
        redis_url=module_redis.url,
        connect_timeout_s=3.0,
        max_new_tokens_caps="describe=16,ocr=16,compare=16,ask=64",
    )


@pytest.fixture
def client(client_settings: Settings, shared_worker: WorkerProcess) -> Iterator[Client]:
    with Client(client_settings) as c:
        yield c


@pytest.fixture(scope="session")
def images() -> Path:
    return IMAGES
