"""Messages that did not come from our client: never executed, and the worker lives on."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from producer import Client
from producer.celery_config import make_celery_app

pytestmark = pytest.mark.timeout(300)


class _Exploit:
    """Unpickling this would create a file: proof that a pickle payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def publish_raw(client: Client, name: str, body: object, serializer: str) -> str:
    app = make_celery_app(client.settings)
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "argsrepr": "",
        "kwargsrepr": "",
    }
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            serializer=serializer,
            headers=headers,
            exchange="gpu",
            routing_key="gpu",
            declare=[app.amqp.queues["gpu"]],
        )
    return task_id


def assert_still_serving(client: Client, images: Path) -> None:
    handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    result = client.result(handle.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS"


def test_a_pickle_message_is_refused_unread(client: Client, images: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    body = (
        (_Exploit(marker),),
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    publish_raw(client, "vision_queue.describe", body, "pickle")
    assert_still_serving(client, images)  # the worker took the pickle message before this one
    assert not marker.exists()


def test_a_message_for_an_unregistered_task_is_not_executed(
    client: Client, images: Path, shared_worker
):
    body = (["rm -rf /"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    task_id = publish_raw(client, "os.system", body, "json")
    assert_still_serving(client, images)
    # Celery refuses the name before looking at the arguments, and records why.
    meta = make_celery_app(client.settings).backend.get_task_meta(task_id)
    assert meta["status"] == "FAILURE"
    assert type(meta["result"]).__name__ == "NotRegistered"
    assert "unregistered task" in shared_worker.log().lower()
