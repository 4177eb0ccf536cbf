"""The Python client against a real redis-server and a real worker on the tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from producer import Client, TaskName, UnknownTaskId
from vision_queue.errors import InvalidInput
from vision_queue.presence import live_workers
from vision_queue.protocol import TASK_SPECS

pytestmark = pytest.mark.timeout(300)

RESULT_KEYS = {"id", "task", "text", "model", "usage", "timings", "worker", "device", "state"}
TIMING_KEYS = {"queued", "fetch", "preprocess", "generate", "total"}


def assert_success(result: dict, task: str, worker_name: str) -> None:
    assert result["state"] == "SUCCESS", result
    assert set(result) >= RESULT_KEYS
    assert result["task"] == task
    assert set(result["timings"]) == TIMING_KEYS
    assert all(value >= 0 for value in result["timings"].values())
    assert result["usage"]["prompt_tokens"] > 0
    assert 1 <= result["usage"]["completion_tokens"] <= 16 or task == "ask"
    assert result["worker"] == worker_name
    assert result["device"] == "cpu"
    assert result["model"].endswith("model")
    json.dumps(result)  # a result is plain JSON


@pytest.mark.parametrize(
    ("task", "files", "prompt"),
    [
        (TaskName.DESCRIBE, ["shapes_640x480.png"], None),
        (TaskName.OCR, ["doc_900x600.png"], None),
        (TaskName.COMPARE, ["shapes_640x480.png", "shapes_b_640x480.png"], None),
        (TaskName.ASK, [], "Write a haiku about queues."),
        (TaskName.ASK, ["tall_300x600.jpg", "wide_800x400.png"], "Which image is wider?"),
    ],
)
def test_every_task_type_succeeds_through_the_client(
    client: Client, shared_worker, images: Path, task, files, prompt
) -> None:
    # Given image bytes from a web backend
    blobs = [(images / name).read_bytes() for name in files]
    # When the job is submitted and awaited
    handle = client.submit(task, blobs, prompt, max_new_tokens=8 if task is TaskName.ASK else None)
    result = client.result(handle.id, wait=True, timeout=120)
    # Then a complete result comes back from the worker
    assert result is not None
    assert_success(result, task.value, shared_worker.name)
    assert result["id"] == handle.id


def test_result_without_wait_reports_nothing_until_done_then_the_result(
    client: Client, images: Path
) -> None:
    handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    first = client.result(handle.id)  # may already be done on a fast machine
    final = client.result(handle.id, wait=True, timeout=120)
    assert first is None or first["state"] == "SUCCESS"
    assert final is not None and final["state"] == "SUCCESS"
    assert client.status(handle.id).state == "SUCCESS"


def test_the_same_image_is_staged_once_and_the_message_stays_small(
    client: Client, images: Path, module_redis
) -> None:
    data = (images / "street_1280x720.jpg").read_bytes()
    first = client.submit("describe", [data])
    second = client.submit("describe", [data])
    digest = hashlib.sha256(data).hexdigest()
    assert list(module_redis.client().scan_iter(f"vq:img:{digest[:16]}*")) == [
        f"vq:img:{digest}".encode()
    ]
    for handle in (first, second):
        result = client.result(handle.id, wait=True, timeout=120)
        assert result is not None and result["state"] == "SUCCESS"


def test_an_unknown_id_is_reported_as_unknown_not_pending(client: Client) -> None:
    with pytest.raises(UnknownTaskId):
        client.status("00000000-0000-4000-8000-000000000000")
    with pytest.raises(UnknownTaskId):
        client.result("not-a-task-id")


def test_fixed_prompts_are_the_contracts(client: Client, images: Path) -> None:
    assert TASK_SPECS[TaskName.OCR].fixed_prompt
    with pytest.raises(InvalidInput) as error:
        client.submit("ocr", [(images / "doc_900x600.png").read_bytes()], "my own prompt")
    assert error.value.field == "prompt"


def test_a_running_worker_is_announced_live_on_its_queue(client: Client, shared_worker) -> None:
    deadline = time.monotonic() + 30  # announced by the first beat of its lease keeper
    while shared_worker.name not in live_workers(client._redis, "gpu"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
