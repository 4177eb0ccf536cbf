"""Faults of a worker running several tasks at once: every task ends with exactly one success."""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from support.workers import WorkerProcess, wait_until_generating

from producer import Client
from vision_queue.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SLOTS = 3
# Redelivery within seconds of a worker's death; time enough for three batched tasks.
BATCHED = {
    "VQ_MAX_BATCH": str(SLOTS),
    "VQ_VISIBILITY_TIMEOUT_S": "30",
    "VQ_TASK_TIME_LIMIT_S": "25",
    "VQ_RESTORE_INTERVAL_S": "1",
    "VQ_MAX_NEW_TOKENS_CAPS": "ask=4000,describe=16,ocr=16,compare=16",
}
# Long enough to be caught running side by side, short enough to finish in the limit.
RUNNING_TOKENS = 600


def successes(workers: Iterable[WorkerProcess]) -> Counter[str]:
    found: Counter[str] = Counter()
    for worker in workers:
        found.update(re.findall(r"task id=(\S+) task=\S+ outcome=success", worker.log()))
    return found


@pytest.fixture
def batch_client(redis_url: str) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=redis_url, max_new_tokens_caps="ask=4000")
    with Client(settings) as client:
        yield client


def start_running(client: Client, worker: WorkerProcess) -> list[str]:
    """SLOTS tasks, all generating on `worker` at once."""
    ids = [
        client.submit("ask", [], f"Tell story {n}.", max_new_tokens=RUNNING_TOKENS).id
        for n in range(SLOTS)
    ]
    for task_id in ids:
        assert wait_until_generating(client, task_id, timeout_s=120).worker == worker.name
    return ids


def test_sigterm_lets_every_running_task_finish(
    redis_url: str, batch_client: Client, tmp_path: Path
) -> None:
    with WorkerProcess(redis_url, tmp_path, **BATCHED) as worker:
        ids = start_running(batch_client, worker)

        worker.signal(signal.SIGTERM)

        assert worker.wait(timeout_s=120) == 0
    for task_id in ids:
        result = batch_client.result(task_id)
        assert result is not None and result["state"] == "SUCCESS", result
        assert result["usage"]["completion_tokens"] == RUNNING_TOKENS
    assert all(successes([worker])[task_id] == 1 for task_id in ids)


def test_sigkill_of_a_worker_running_several_brings_each_back_once(
    redis_url: str, batch_client: Client, tmp_path: Path
) -> None:
    victim = WorkerProcess(redis_url, tmp_path, **BATCHED).start()
    ids = start_running(batch_client, victim)

    victim.signal(signal.SIGKILL)
    victim.wait()
    with WorkerProcess(redis_url, tmp_path, **BATCHED) as replacement:
        results = [batch_client.result(i, wait=True, timeout=240) for i in ids]

    assert all(r is not None and r["state"] == "SUCCESS" for r in results), results
    counts = successes([victim, replacement])
    assert all(counts[task_id] == 1 for task_id in ids), counts
    print(f"\nreliability: sigkill with {SLOTS} running: {SLOTS}/{SLOTS} back, none twice")
