"""Faults of workers and Redis: an accepted job ends with exactly one result.

Figures printed here (rounds, run times) are recorded in docs/reliability.md.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from support.redis_server import RedisServer
from support.workers import WorkerProcess, base_env, wait_until_generating

from producer import Client
from producer.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# A short visibility timeout so a message whose worker died comes back within seconds.
FAST_REDELIVERY = {
    "VQ_VISIBILITY_TIMEOUT_S": "10",
    "VQ_TASK_TIME_LIMIT_S": "8",
    "VQ_RESTORE_INTERVAL_S": "1",
    "VQ_MAX_NEW_TOKENS_CAPS": "ask=4000,describe=16,ocr=16,compare=16",
}
# Long enough on the tiny model to be caught running, short enough to finish in time.
RUNNING_TOKENS = 2500


def successes(workers: Iterable[WorkerProcess]) -> Counter[str]:
    found: Counter[str] = Counter()
    for worker in workers:
        found.update(re.findall(r"task id=(\S+) task=\S+ outcome=success", worker.log()))
    return found


@pytest.fixture
def fast_client(redis_url: str) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=redis_url, max_new_tokens_caps="ask=4000")
    with Client(settings) as client:
        yield client


def test_sigkill_mid_generation_redelivers_and_ends_with_exactly_one_success(
    redis_url: str, fast_client: Client, tmp_path: Path
) -> None:
    rounds = 5
    workers = {
        w.name: w
        for w in (WorkerProcess(redis_url, tmp_path, **FAST_REDELIVERY).start() for _ in range(2))
    }
    everyone = list(workers.values())
    try:
        ids = []
        for _ in range(rounds):
            handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
            victim = workers[wait_until_generating(fast_client, handle.id).worker]
            victim.signal(signal.SIGKILL)
            victim.wait()
            replacement = WorkerProcess(redis_url, tmp_path, **FAST_REDELIVERY).start(
                wait_ready=False
            )
            del workers[victim.name]
            workers[replacement.name] = replacement
            everyone.append(replacement)
            result = fast_client.result(handle.id, wait=True, timeout=120)
            assert result is not None and result["state"] == "SUCCESS", result
            ids.append(handle.id)
        counts = successes(everyone)
        assert all(counts[task_id] == 1 for task_id in ids), counts
        print(f"\nreliability: sigkill rounds={rounds} lost=0 duplicated=0")
    finally:
        for worker in workers.values():
            worker.stop()


def test_sigterm_lets_the_running_task_finish(redis_url, fast_client: Client, tmp_path: Path):
    with WorkerProcess(redis_url, tmp_path, **FAST_REDELIVERY) as worker:
        handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        wait_until_generating(fast_client, handle.id)
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout_s=60) == 0
    result = fast_client.result(handle.id)
    assert result is not None and result["state"] == "SUCCESS"
    assert successes([worker])[handle.id] == 1


def test_a_second_signal_stops_at_once_and_the_task_is_redelivered(
    redis_url, fast_client: Client, tmp_path: Path
):
    first = WorkerProcess(redis_url, tmp_path, **FAST_REDELIVERY).start()
    handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
    wait_until_generating(fast_client, handle.id)
    first.signal(signal.SIGTERM)
    time.sleep(0.2)
    first.signal(signal.SIGQUIT)  # cold shutdown: do not wait for the task
    first.wait(timeout_s=30)
    assert successes([first])[handle.id] == 0
    with WorkerProcess(redis_url, tmp_path, **FAST_REDELIVERY) as second:
        result = fast_client.result(handle.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS"
    assert successes([first, second])[handle.id] == 1


def test_redis_restart_with_100_queued_tasks_loses_none(
    redis_server: RedisServer, redis_url: str, fast_client: Client, tmp_path: Path, images: Path
):
    image = (images / "small_400x300.jpg").read_bytes()
    handles = [fast_client.submit("describe", [image], max_new_tokens=1) for _ in range(100)]
    began = time.monotonic()
    with WorkerProcess(redis_url, tmp_path, **FAST_REDELIVERY) as worker:
        while fast_client._redis.llen("gpu") > 90:  # a few done, most still queued
            time.sleep(0.05)
        redis_server.restart()  # AOF on: queued messages and results survive
        results = [fast_client.result(h.id, wait=True, timeout=300) for h in handles]
    failed = [r for r in results if r is None or r["state"] != "SUCCESS"]
    assert not failed, failed[:3]
    print(
        f"\nreliability: redis restart with 100 queued: 100/100 in {time.monotonic() - began:.1f}s"
    )
    assert successes([worker]).total() >= 100


def test_a_burst_of_1000_tasks_on_2_workers_gives_1000_results(
    redis_url: str, fast_client: Client, tmp_path: Path
):
    with WorkerProcess(redis_url, tmp_path) as a, WorkerProcess(redis_url, tmp_path) as b:
        began = time.monotonic()
        handles = [
            fast_client.submit("ask", [], f"Say {i}.", max_new_tokens=1) for i in range(1000)
        ]
        submitted = time.monotonic() - began
        results = [fast_client.result(h.id, wait=True, timeout=600) for h in handles]
        elapsed = time.monotonic() - began
        per_worker = [successes([w]).total() for w in (a, b)]
    failed = [r for r in results if r is None or r["state"] != "SUCCESS"]
    assert not failed, failed[:3]
    assert len({r["id"] for r in results if r}) == 1000
    counts = successes([a, b])
    assert all(counts[h.id] == 1 for h in handles)
    print(
        f"\nreliability: burst 1000 on 2 workers: submitted in {submitted:.1f}s, "
        f"all done in {elapsed:.1f}s, per worker {per_worker}"
    )


def test_a_task_that_kills_its_worker_every_time_fails_after_bounded_deliveries(
    redis_url: str, fast_client: Client, tmp_path: Path
):
    env = {
        **FAST_REDELIVERY,
        "VQ_MAX_DELIVERIES": "2",
        "VQ_FAULT_INJECTION": "crash_marker=__CRASH__",
    }
    handle = fast_client.submit("ask", [], "__CRASH__ now", max_new_tokens=4)
    started = 0
    deadline = time.monotonic() + 240
    # Keep one worker running, as a supervisor would, until the task has an outcome.
    while not fast_client.status(handle.id).done and time.monotonic() < deadline:
        worker = WorkerProcess(redis_url, tmp_path, **env).start(wait_ready=False)
        started += 1
        while worker.process is not None and worker.process.poll() is None:
            if fast_client.status(handle.id).done:
                break
            time.sleep(0.1)
        worker.stop()
    result = fast_client.result(handle.id)
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "model_error"
    assert started == 3  # two deliveries crashed a worker, the third was refused
    print(f"\nreliability: crash loop ended after {started} worker starts")


def test_redis_down_during_submit_exits_3_within_a_bounded_time(
    redis_server: RedisServer, redis_url: str, images: Path
):
    redis_server.stop()
    try:
        began = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "producer.cli",
                "submit",
                "--task",
                "describe",
                "--image",
                str(images / "small_400x300.jpg"),
            ],
            env=base_env(redis_url, VQ_CONNECT_TIMEOUT_S="3"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        elapsed = time.monotonic() - began
    finally:
        redis_server.start()
    assert done.returncode == 3, done.stderr
    assert "unreachable" in done.stderr
    assert elapsed < 15
    print(f"\nreliability: submit with redis down exited 3 in {elapsed:.1f}s")
