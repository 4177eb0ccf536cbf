"""Every documented error code is reachable on a real worker, and the worker survives each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.http_server import IMAGE_HOST, Route, serve
from support.images import png_header_only

from producer import Client, TaskName
from vision_queue.celery_config import make_celery_app
from vision_queue.protocol import DELIVERIES_KEY
from vision_queue.schemas import ImageRef, ImageSource
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def loopback_client(client_settings: Settings, shared_worker):
    """A client allowed to name the tests' loopback server, as the worker is."""
    settings = Settings.from_env(
        {},
        redis_url=client_settings.redis_url,
        allowed_private_hosts=IMAGE_HOST,
        max_new_tokens_caps=client_settings.max_new_tokens_caps,
    )
    with Client(settings) as client:
        yield client


def failure_of(client: Client, task_id: str) -> dict:
    result = client.result(task_id, wait=True, timeout=120)
    assert result is not None and result["state"] == "FAILURE", result
    assert set(result["error"]) >= {"code", "message"}
    return result


def test_worker_rechecks_requests_it_did_not_get_from_the_client(loopback_client: Client):
    # A raw message (e.g. written by another program) asking compare for one image.
    app = make_celery_app(loopback_client.settings)
    message = {
        "v": 1,
        "task": "compare",
        "prompt": None,
        "options": {},
        "images": [{"source": "staged", "ref": "0" * 64}],
        "submitted_at": 0,
    }
    sent = app.send_task(TaskName.COMPARE.celery_name, args=(message,), queue="gpu")
    loopback_client._redis.set(f"vq:submitted:{sent.id}", "compare")
    result = failure_of(loopback_client, sent.id)
    assert result["error"] == {
        "code": "invalid_input",
        "field": "images",
        "message": "compare takes 2..8 image(s), got 1",
    }


@pytest.mark.parametrize(
    ("route", "code"),
    [
        (Route(404, b"gone"), "image_fetch_failed"),
        (Route(200, b"<html><body>not an image</body></html>", "text/html"), "unsupported_image"),
        (Route(200, png_header_only(20000, 20000), "image/png"), "image_too_large"),
    ],
)
def test_url_images_fail_with_their_code(loopback_client: Client, route: Route, code: str):
    with serve({"/image": route}) as server:
        handle = loopback_client.submit("describe", [server.url("/image?token=secret")])
        result = failure_of(loopback_client, handle.id)
    assert result["error"]["code"] == code
    assert "secret" not in result["error"]["message"]
    # Nor anywhere in what is stored about the task (the meta keeps no arguments)
    stored = loopback_client._redis.get(f"celery-task-meta-{handle.id}")
    assert stored is not None and b"secret" not in stored


def test_a_staged_key_of_the_wrong_type_is_a_fetch_failure_at_once(loopback_client: Client):
    digest = "cd" * 32
    loopback_client._redis.hset(f"vq:img:{digest}", "not", "an image")
    handle = loopback_client.submit("describe", [ImageRef(ImageSource.STAGED, digest)])
    error = failure_of(loopback_client, handle.id)["error"]
    assert error["code"] == "image_fetch_failed" and "wrong Redis type" in error["message"]


def test_a_staged_image_that_expired_is_a_fetch_failure(loopback_client: Client):
    handle = loopback_client.submit("describe", [ImageRef(ImageSource.STAGED, "ab" * 32)])
    assert failure_of(loopback_client, handle.id)["error"]["code"] == "image_fetch_failed"


def test_out_of_memory_fails_the_task_and_the_worker_keeps_serving(
    loopback_client: Client, images: Path
):
    oom = loopback_client.submit("ask", [], "__OOM__ describe nothing")
    assert failure_of(loopback_client, oom.id)["error"]["code"] == "resource_exhausted"
    after = loopback_client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    result = loopback_client.result(after.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS"


def test_a_task_whose_deliveries_are_spent_fails_as_model_error(loopback_client: Client):
    # Given a message that (as its counter says) already killed a worker VQ_MAX_DELIVERIES times
    app = make_celery_app(loopback_client.settings)
    task_id = "11111111-1111-4111-8111-111111111111"
    loopback_client._redis.set(DELIVERIES_KEY.format(task_id=task_id) + ":0", 3)
    loopback_client._redis.set(f"vq:submitted:{task_id}", "ask")
    message = {"v": 1, "task": "ask", "prompt": "hi", "images": [], "options": {}}
    app.send_task(TaskName.ASK.celery_name, args=(message,), task_id=task_id, queue="gpu")
    # Then the next delivery is refused instead of running again
    error = failure_of(loopback_client, task_id)["error"]
    assert error["code"] == "model_error"
    assert "died" in error["message"]


def test_coded_failures_are_logged_one_line_each_without_a_traceback(shared_worker) -> None:
    # Runs last in this module: the worker has failed with invalid_input, image_fetch_failed,
    # unsupported_image, image_too_large, resource_exhausted and model_error by now.
    log = shared_worker.log()
    outcomes = re.findall(r"task id=\S+ task=\S+ outcome=(\S+)", log)
    assert {"invalid_input", "image_fetch_failed", "resource_exhausted"} <= set(outcomes)
    assert "Traceback" not in log
    assert not [line for line in log.splitlines() if " ERROR " in line]
