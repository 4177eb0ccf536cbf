"""Fixtures owning real processes: a worker and `producer serve` on the module's Redis."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from gateway_support import API_KEY, STACK_ENV, GatewayProcess
from support.redis_server import RedisServer
from support.workers import WorkerProcess


@pytest.fixture(scope="module")
def shared_worker(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """The module's worker, with the gateways' limits, sending webhooks to loopback."""
    with WorkerProcess(
        module_redis.url, tmp_path_factory.mktemp("worker"), **STACK_ENV
    ) as worker:
        yield worker


@pytest.fixture(scope="module")
def gateway(
    module_redis: RedisServer,
    shared_worker: WorkerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    with GatewayProcess(module_redis.url, tmp_path_factory.mktemp("gateway")) as process:
        yield process


@pytest.fixture
def api(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """An HTTP client with the test key, as a backend in any language would hold."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture
def sdk(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    """The official OpenAI SDK with the test key. No retries: a test must see the gateway's
    first answer."""
    with openai.OpenAI(
        base_url=gateway.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        yield client
