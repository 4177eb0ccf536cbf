"""A real worker takes a waiting high task before the low ones queued ahead of it.

All thirteen tasks are waiting before the worker starts, so the order it takes them in is
its choice alone (no race with the producer); completion times come from the results the
worker stored (Celery's `date_done`). An unreadable item on two of the lists shows the
worker's door guards every list.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import redis
from support.messages import wait_for_dead_letters
from support.workers import WorkerProcess

from producer import Client
from vision_queue.protocol import RESULT_KEY, priority_queues
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(600)


def finished_at(admin: redis.Redis, task_id: str) -> datetime:
    meta = json.loads(admin.get(RESULT_KEY.format(task_id=task_id)) or b"{}")
    return datetime.fromisoformat(meta["date_done"])


def test_a_high_task_queued_behind_twelve_low_ones_finishes_before_at_least_eight(
    redis_url: str, tmp_path: Path
):
    settings = Settings.from_env({}, redis_url=redis_url, connect_timeout_s=3.0)
    admin = redis.Redis.from_url(redis_url)
    with Client(settings) as client:
        # Given 12 low tasks queued, then one high task
        lows = [
            client.submit("ask", [], f"Count to {i}.", max_new_tokens=2, priority="low")
            for i in range(12)
        ]
        high = client.submit("ask", [], "Say hi.", max_new_tokens=2, priority="high")
        # and an item that is no message at all on the high and the low list
        admin.lpush("gpu.high", b"not a message")
        admin.lpush("gpu.low", b"\xff\xfe not a message either")
        assert [admin.llen(queue) for queue in priority_queues(settings.queue)] == [2, 0, 13]
        # When one worker serves the queue
        with WorkerProcess(redis_url, tmp_path):
            results = {
                handle.id: client.result(handle.id, wait=True, timeout=300)
                for handle in [high, *lows]
            }
            refused = wait_for_dead_letters(admin, 2)
    # Then every task succeeded, and the high one finished before at least 8 of the lows
    assert all(result and result["state"] == "SUCCESS" for result in results.values()), results
    high_done = finished_at(admin, high.id)
    later = [low for low in lows if finished_at(admin, low.id) > high_done]
    assert len(later) >= 8, (len(later), high_done)
    # and the unreadable items were refused at the door, each named by its list
    assert sorted(entry["queue"] for entry in refused) == ["gpu.high", "gpu.low"]
    assert {entry["code"] for entry in refused} == {"envelope"}
    assert [admin.llen(queue) for queue in priority_queues(settings.queue)] == [0, 0, 0]
