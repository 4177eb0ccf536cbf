"""Celery's remote-control channel, as an attacker with the Redis password could use it:
a real worker refuses what would stop or reconfigure it, drops malformed broadcasts in one
log line each, and keeps answering inspection and serving tasks.

Valid broadcasts go through Celery's own client (`app.control`); malformed ones are
PUBLISHed raw, the way kombu's Redis transport carries a fanout message.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.workers import WorkerProcess

from producer import Client
from vision_queue.celery_config import make_celery_app
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(300)

# Each reply is awaited until the first one arrives (limit=1), however slow the machine.
REPLY_WAIT_S = 120


@pytest.fixture
def celery_app(client_settings: Settings) -> Iterator[Any]:
    app = make_celery_app(client_settings)
    yield app
    app.close()


def raw_broadcast(client: Client, body: Any, headers: Any = None) -> None:
    """PUBLISH one message on the workers' pidbox exchange, as kombu stores a fanout."""
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"clock": 1} if headers is None else headers,
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    channel = f"/{client._redis.connection_pool.connection_kwargs.get('db', 0)}.celery.pidbox"
    client._redis.publish(channel, json.dumps(message))


def reply_of(replies: list[dict[str, Any]], worker: WorkerProcess) -> Any:
    [reply] = replies
    return reply[worker.name]


def test_a_shutdown_broadcast_is_refused_and_the_worker_serves_on(
    celery_app: Any, client: Client, shared_worker: WorkerProcess, images: Path
) -> None:
    replies = celery_app.control.broadcast("shutdown", reply=True, timeout=REPLY_WAIT_S, limit=1)
    assert reply_of(replies, shared_worker) == {
        "error": "shutdown is refused by this worker (VQ_REMOTE_CONTROL=restricted)"
    }
    replies = celery_app.control.broadcast(
        "pool_restart", reply=True, timeout=REPLY_WAIT_S, limit=1
    )
    assert "refused" in reply_of(replies, shared_worker)["error"]
    assert "refused remote control command shutdown" in shared_worker.log()
    _assert_serving(client, shared_worker, images)


def test_inspection_still_answers(celery_app: Any, shared_worker: WorkerProcess) -> None:
    inspect = celery_app.control.inspect(timeout=REPLY_WAIT_S, limit=1)
    stats = inspect.stats()
    assert "pool" in stats[shared_worker.name]
    assert celery_app.control.ping(timeout=REPLY_WAIT_S, limit=1) == [
        {shared_worker.name: {"ok": "pong"}}
    ]
    # A broadcast Flower's terminate button sends: cancelled cooperatively, no traceback.
    task_id = str(uuid.uuid4())
    celery_app.control.revoke(task_id, terminate=True, signal="SIGKILL")
    assert task_id in inspect.revoked()[shared_worker.name]


MALFORMED = [
    (["ping"], None),
    ({"method": "ping", "self": 1}, None),
    ({"method": "no_such_command"}, None),
    ({"method": "revoke", "arguments": ["abc"]}, None),
    ({"method": "revoke", "arguments": {"state": 1}}, None),
    ({"method": "ping", "destination": "everyone"}, None),
    ({"method": "ping", "pattern": "(.*a){25}", "matcher": "pcre"}, None),
    ({"method": "ping", "reply_to": "nowhere"}, None),
    ({"method": "ping"}, {"clock": "late"}),
    # kombu itself fails on these two while building the message: the worker stopped.
    ({"method": "ping"}, ["not", "headers"]),
    ({"method": "ping"}, {"compression": "application/x-gzip"}),
]
REFUSED = ("refused control message:", "refused broadcast on")


def test_malformed_broadcasts_are_dropped_in_one_line_each(
    celery_app: Any, client: Client, shared_worker: WorkerProcess, images: Path
) -> None:
    before = sum(shared_worker.log().count(line) for line in REFUSED)
    for body, headers in MALFORMED:
        raw_broadcast(client, body, headers)
    # Broadcasts are handled in order: once this one answers, every one above was seen.
    assert celery_app.control.ping(timeout=REPLY_WAIT_S, limit=1) == [
        {shared_worker.name: {"ok": "pong"}}
    ]
    log = shared_worker.log()
    assert sum(log.count(line) for line in REFUSED) - before == len(MALFORMED)
    assert "Control command error" not in log
    assert "No such control command" not in log
    assert "Traceback" not in log
    _assert_serving(client, shared_worker, images)


def test_full_mode_answers_every_command_shutdown_included(
    module_redis: Any, celery_app: Any, shared_worker: WorkerProcess, tmp_path: Path
) -> None:
    with WorkerProcess(module_redis.url, tmp_path, VQ_REMOTE_CONTROL="full") as full:
        # Answered once it listens: a broadcast sent earlier would reach no one.
        assert celery_app.control.ping([full.name], timeout=REPLY_WAIT_S, limit=1)
        celery_app.control.broadcast("shutdown", destination=[full.name])
        full.wait(timeout_s=REPLY_WAIT_S)
        assert "Got shutdown from remote" in full.log()
    assert shared_worker.process is not None and shared_worker.process.poll() is None


def _assert_serving(client: Client, worker: WorkerProcess, images: Path) -> None:
    handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    result = client.result(handle.id, wait=True, timeout=REPLY_WAIT_S)
    assert result is not None and result["state"] == "SUCCESS"
    assert worker.process is not None and worker.process.poll() is None
