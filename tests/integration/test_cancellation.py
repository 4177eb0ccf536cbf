"""Cancelling queued and running tasks, and the task time limit, on a real worker."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from support.workers import WorkerProcess, wait_until_generating

from producer import Client
from producer.settings import Settings

pytestmark = pytest.mark.timeout(300)

LONG = 100_000  # tokens: far more than the time limit allows on a CPU


@pytest.fixture(scope="module")
def slow_worker(module_redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        module_redis.url,
        tmp_path_factory.mktemp("slow-worker"),
        VQ_MAX_NEW_TOKENS_CAPS=f"ask={LONG}",
        VQ_TASK_TIME_LIMIT_S="6",
        VQ_VISIBILITY_TIMEOUT_S="60",
    ) as worker:
        yield worker


@pytest.fixture
def long_client(module_redis, slow_worker) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=module_redis.url, max_new_tokens_caps=f"ask={LONG}")
    with Client(settings) as client:
        yield client


def test_a_running_task_stops_at_its_next_token_and_ends_cancelled(long_client: Client):
    handle = long_client.submit("ask", [], "Tell a very long story.", max_new_tokens=LONG)
    wait_until_generating(long_client, handle.id)
    cancelled_at = time.monotonic()
    long_client.cancel(handle.id)
    result = long_client.result(handle.id, wait=True, timeout=60)
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "cancelled"
    assert time.monotonic() - cancelled_at < 3


def test_a_queued_task_that_is_cancelled_never_runs(long_client: Client, slow_worker):
    running = long_client.submit("ask", [], "Keep the worker busy.", max_new_tokens=LONG)
    queued = long_client.submit("ask", [], "Never run me.", max_new_tokens=5)
    wait_until_generating(long_client, running.id)
    long_client.cancel(queued.id)
    long_client.cancel(running.id)
    result = long_client.result(queued.id, wait=True, timeout=60)
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "cancelled"
    assert result.get("usage", {}).get("completion_tokens", 0) == 0
    assert f"id={queued.id} task=ask outcome=success" not in slow_worker.log()


def test_a_task_past_the_time_limit_fails_with_timeout(long_client: Client):
    handle = long_client.submit("ask", [], "Tell an endless story.", max_new_tokens=LONG)
    result = long_client.result(handle.id, wait=True, timeout=60)
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "timeout"
    assert result["timings"]["total"] >= 6
