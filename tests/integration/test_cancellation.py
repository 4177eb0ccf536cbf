"""Cancelling queued and running tasks, and the task time limit, on a real worker.

A cancelled task is stored as Celery's REVOKED state carrying its result (the text so
far, its usage, `cancelled` code), so Flower and the metrics count it apart from failures.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.flower import FlowerProcess
from support.redis_server import free_port
from support.workers import WorkerProcess, wait_until_generating

from producer import Client
from vision_queue.settings import Settings

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
        VQ_METRICS_PORT=str(free_port()),
    ) as worker:
        yield worker


@pytest.fixture(scope="module")
def flower(module_redis, slow_worker, tmp_path_factory) -> Iterator[FlowerProcess]:
    """Started before the tasks run: Flower knows only the events it saw live."""
    with FlowerProcess(module_redis.url, tmp_path_factory.mktemp("flower")) as process:
        deadline = time.monotonic() + 30
        while slow_worker.name not in process.get("/metrics", auth=False).text:
            assert time.monotonic() < deadline, process.log()[-2000:]
            time.sleep(0.25)
        yield process


def task_lines(worker: WorkerProcess, task_id: str) -> list[str]:
    return [line for line in worker.log().splitlines() if f"task id={task_id} task=" in line]


@pytest.fixture
def long_client(module_redis, slow_worker) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=module_redis.url, max_new_tokens_caps=f"ask={LONG}")
    with Client(settings) as client:
        yield client


def test_a_running_task_stops_at_its_next_token_and_keeps_its_text(
    long_client: Client, slow_worker: WorkerProcess
):
    handle = long_client.submit("ask", [], "Tell a very long story.", max_new_tokens=LONG)
    wait_until_generating(long_client, handle.id)
    cancelled_at = time.monotonic()
    long_client.cancel(handle.id)
    result = long_client.result(handle.id, wait=True, timeout=60)
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "cancelled"
    assert time.monotonic() - cancelled_at < 3
    # What was generated before the cancel is kept, with its usage.
    assert result["finish_reason"] == "cancelled"
    assert result["usage"]["completion_tokens"] > 0 and result["usage"]["prompt_tokens"] > 0
    assert result["text"]
    # The time it generated is reported, not zero: it ran until the cancel.
    assert 0 < result["timings"]["generate"] <= result["timings"]["total"]
    streamed = [e for e in long_client.stream_events(handle.id) if e.kind == "delta"]
    assert "".join(e.text for e in streamed) == result["text"]
    # One line for the task, and no error logged with a traceback.
    deadline = time.monotonic() + 30
    while not task_lines(slow_worker, handle.id):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [line] = task_lines(slow_worker, handle.id)
    assert "outcome=cancelled" in line
    assert "Traceback" not in slow_worker.log()
    assert not re.search(r" ERROR .*" + handle.id, slow_worker.log())


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
    assert 0 < result["timings"]["generate"] <= result["timings"]["total"]


def test_flower_and_the_metrics_count_a_cancel_apart_from_failures(
    flower: FlowerProcess, long_client: Client, slow_worker: WorkerProcess
):
    running = long_client.submit("ask", [], "A long story.", max_new_tokens=LONG)
    wait_until_generating(long_client, running.id)
    long_client.cancel(running.id)
    result = long_client.result(running.id, wait=True, timeout=60)
    assert result is not None and result["error"]["code"] == "cancelled"

    def flower_state() -> str | None:
        return flower.get("/api/tasks").json().get(running.id, {}).get("state")

    deadline = time.monotonic() + 20
    while flower_state() != "REVOKED":
        assert time.monotonic() < deadline, flower_state()
        time.sleep(0.25)
    assert running.id not in flower.get("/api/tasks?state=FAILURE").json()
    events = {
        sample.labels["type"]
        for family in text_string_to_metric_families(flower.get("/metrics", auth=False).text)
        for sample in family.samples
        if sample.name == "flower_events_total" and sample.labels.get("task") == "vision_queue.ask"
    }
    assert "task-revoked" in events
    port = slow_worker.env["VQ_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'vq_tasks_total{outcome="cancelled",task="ask"}' in body
    # Cancels and the timeout before them were logged without a traceback.
    assert "Traceback" not in slow_worker.log()
