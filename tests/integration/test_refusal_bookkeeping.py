"""A refused message whose bookkeeping Redis fails (worker/broker/door.py): handed back
without blocking the worker, and dead-lettered once Redis takes the write. A real worker
against a real redis-server; the dead-letter list is made unwritable with a key of
another type there (Redis answers WRONGTYPE), so nothing else is disturbed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from support.messages import envelope, headers, push, valid_body, wait_for_dead_letters
from support.workers import WorkerProcess

from producer import Client
from vision_queue.protocol import DEAD_LETTER_KEY

pytestmark = pytest.mark.timeout(300)

FAILED = "could not dead-letter a refused message"


def test_a_refusal_redis_cannot_record_comes_back_and_never_blocks_the_worker(
    client: Client, shared_worker: WorkerProcess, images: Path
) -> None:
    queue = client._redis
    failures_before = shared_worker.log().count(FAILED)
    # Given a dead-letter list Redis refuses to write to
    queue.delete(DEAD_LETTER_KEY)
    queue.set(DEAD_LETTER_KEY, "not a list")
    try:
        # When a message the door refuses arrives
        task_id = str(uuid.uuid4())
        push(queue, envelope(valid_body(), headers(task_id), content_type="application/x-binary"))
        wait_until(lambda: shared_worker.log().count(FAILED) > failures_before, shared_worker)
        # Then the worker still serves the next task (the refused message holds no slot)
        handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
        result = client.result(handle.id, wait=True, timeout=120)
        assert result is not None and result["state"] == "SUCCESS", result
    finally:
        queue.delete(DEAD_LETTER_KEY)
    # and once Redis takes the write, the message comes back and is dead-lettered and
    # answered (it was not kept unacknowledged under a lease renewed for ever)
    (entry,) = wait_for_dead_letters(queue, 1, timeout_s=120)
    assert entry["task_id"] == task_id and entry["code"] == "content_type"
    failure = client.result(task_id, wait=True, timeout=60)
    assert failure is not None and failure["error"]["code"] == "invalid_input", failure


def wait_until(condition: Callable[[], bool], worker: WorkerProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.05)
