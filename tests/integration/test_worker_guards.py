"""A worker guards itself: a stuck slot makes it unready, then hands its message back and
exits; a worker whose visibility timeout differs from the deployment's refuses to start.

Real `worker run` processes, real Redis. Nothing waits on a fixed sleep: each test waits
for the event it checks (a health answer, an exit, a log line).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.redis_server import PASSWORD
from support.workers import WorkerProcess

from producer import Client
from vision_queue.settings import Settings
from worker.health import check_ready, read_health
from worker.shutdown import EXIT_TASK_STUCK

pytestmark = pytest.mark.timeout(300)


def wait_for(condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"no {what} within {timeout_s}s")


def test_a_stuck_slot_fails_readiness_then_the_worker_hands_it_back_and_exits(
    redis_url: str, tmp_path: Path
):
    # Given a worker whose tasks count as stuck 2 + 8 s after they start, and a task that
    # blocks forever inside the engine (test-only fault injection)
    worker = WorkerProcess(
        redis_url,
        tmp_path,
        VQ_FAULT_INJECTION="hang_marker=__HANG__",
        VQ_TASK_TIME_LIMIT_S="2",
        VQ_STUCK_TASK_GRACE_S="8",
    ).start()
    settings = Settings.from_env({}, redis_url=redis_url, heartbeat_interval_s=0.5)
    try:
        with Client(settings) as client:
            handle = client.submit("ask", [], "__HANG__ and never answer")
            wait_for(
                lambda: handle.id in ((read_health(worker.health_file) or {}).get("running") or {}),
                what="task running",
            )

            # When readiness is asked until it fails
            def unready() -> str | None:
                ready, reason = check_ready(worker.health_file, settings)
                return None if ready else reason

            reason = wait_for(unready, what="readiness failure")
            alive_while_unready = worker.process is not None and worker.process.poll() is None
            # Then it failed because of the stuck task, while the worker still ran
            assert "stuck" in reason and handle.id in reason, reason
            assert alive_while_unready
            # And the watchdog hands the message back and exits non-zero
            assert worker.wait(timeout_s=60) == EXIT_TASK_STUCK
            queued = [
                json.loads(item)["headers"]["id"] for item in client._redis.lrange("gpu", 0, -1)
            ]
            assert queued == [handle.id]
            assert not client._redis.hlen("unacked")
            assert f"task id={handle.id} stuck" in worker.log()
    finally:
        worker.stop()


def test_a_worker_with_another_visibility_timeout_refuses_to_start(
    redis_url: str, tmp_path: Path, images: Path
):
    # Given a running worker (its password given as ?password=, which used to crash kombu)
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    query_url = f"redis://127.0.0.1:{port}/0?password={PASSWORD}"
    first = WorkerProcess(query_url, tmp_path, VQ_VISIBILITY_TIMEOUT_S="3600").start()
    try:
        # When a second worker on the same database starts with a shorter visibility timeout
        second = WorkerProcess(
            redis_url, tmp_path, VQ_VISIBILITY_TIMEOUT_S="60", VQ_TASK_TIME_LIMIT_S="30"
        )
        second.start(wait_ready=False)
        code = second.wait(timeout_s=120)
        second.stop()
        # Then it refuses, naming both values and the setting, before loading any model
        assert code == 2
        log = second.log()
        assert "VQ_VISIBILITY_TIMEOUT_S=60" in log and "VQ_VISIBILITY_TIMEOUT_S=3600" in log
        assert "model failed to load" not in log and "warmup took" not in log
        # And the first keeps serving, its password never printed
        with Client(Settings.from_env({}, redis_url=redis_url)) as client:
            handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
            result = client.result(handle.id, wait=True, timeout=120)
        assert result is not None and result["state"] == "SUCCESS"
        assert result["worker"] == first.name
        assert PASSWORD not in first.log()
    finally:
        first.stop()
