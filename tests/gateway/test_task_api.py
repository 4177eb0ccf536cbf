"""The native task API over HTTP, as a backend in any language uses it.

Real parts: `producer serve`, redis-server, a worker on the tiny checkpoint, a loopback
receiver for webhooks, plain HTTP (httpx here, Node's fetch in readme_examples.mjs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import (
    API_KEY,
    ENDLESS,
    MODEL,
    OTHER_KEY,
    WEBHOOK_SECRET,
    Event,
    GatewayProcess,
    SentEvents,
    data_uri,
    image_bytes,
    read_events,
    submitted_count,
    wait_for_result,
)
from support.http_server import Route, serve
from support.redis_server import RedisServer
from support.webhook_receiver import WebhookReceiver, documented_verifier
from support.workers import IMAGES

pytestmark = pytest.mark.timeout(300)

RESULT_KEYS = {
    "id", "task", "state", "text", "model", "usage", "finish_reason", "timings", "worker",
    "device",
}


def submit(api: httpx.Client, **body: Any) -> str:
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    task_id = str(response.json()["id"])
    assert response.headers["location"] == f"/v1/tasks/{task_id}"
    assert response.json() == {"id": task_id, "task": body["task"], "state": "PENDING"}
    return task_id


def events(api: httpx.Client, task_id: str, last_event_id: str | None = None) -> Iterator[Event]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with api.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield from read_events(response.iter_lines())


def test_a_json_submission_with_base64_runs_to_a_result(api: httpx.Client, shared_worker):
    task_id = submit(api, task="describe", images=[{"data": data_uri()}])

    result = wait_for_result(api, task_id)

    assert result["state"] == "SUCCESS", result
    assert set(result) == RESULT_KEYS
    assert result["id"] == task_id and result["task"] == "describe"
    assert result["worker"] == shared_worker.name
    assert result["usage"]["completion_tokens"] >= 1


def test_a_multipart_upload_of_files_runs_to_a_result(api: httpx.Client):
    files = [
        ("images", ("a.png", image_bytes("shapes_640x480.png"), "image/png")),
        ("images", ("b.png", image_bytes("shapes_b_640x480.png"), "image/png")),
    ]
    response = api.post("/v1/tasks", data={"task": "compare"}, files=files)
    assert response.status_code == 202, response.text

    result = wait_for_result(api, response.json()["id"])
    assert result["state"] == "SUCCESS" and result["task"] == "compare"


def test_a_priority_sends_the_task_to_its_list_and_the_worker_runs_it(
    api: httpx.Client, module_redis: RedisServer
):
    sent = SentEvents(module_redis.url)
    try:
        # Given a high task as JSON and a low one as a multipart form
        high = submit(api, task="ask", prompt="Say hi.", options={"max_new_tokens": 2},
                      priority="high")
        form = {"task": "ask", "prompt": "Hi.", "priority": "low",
                "options": '{"max_new_tokens": 2}'}
        files = [("images", ("a.jpg", image_bytes("small_400x300.jpg"), "image/jpeg"))]
        response = api.post("/v1/tasks", data=form, files=files)
        assert response.status_code == 202, response.text
        low = response.json()["id"]
        # Then each was pushed onto its priority's list, and the worker, consuming all
        # three, runs both
        assert sent.queues(2) == {high: "gpu.high", low: "gpu.low"}
    finally:
        sent.close()
    for task_id in (high, low):
        assert wait_for_result(api, task_id)["state"] == "SUCCESS"


def test_an_image_url_is_fetched_by_the_worker(api: httpx.Client):
    with serve({"/doc.png": Route(200, image_bytes("doc_900x600.png"), "image/png")}) as server:
        task_id = submit(api, task="ocr", images=[{"url": server.url("/doc.png?sig=abc")}])
        assert wait_for_result(api, task_id)["state"] == "SUCCESS"
        assert server.requests == ["/doc.png?sig=abc"]


def test_events_stream_the_text_as_it_is_generated_then_the_result(api: httpx.Client):
    task_id = submit(api, task="ask", prompt="Tell a story about a queue.",
                     options={"max_new_tokens": 24})

    seen = list(events(api, task_id))

    assert seen[0].name == "status" and seen[0].json()["id"] == task_id
    deltas = [event for event in seen if event.name == "delta"]
    end = seen[-1]
    assert end.name == "end"
    result = end.json()
    assert result == wait_for_result(api, task_id)
    assert "".join(delta.json()["text"] for delta in deltas) == result["text"]
    assert [delta.json()["seq"] for delta in deltas] == list(range(len(deltas)))
    assert all(delta.id for delta in deltas)  # cursors for Last-Event-ID


def test_a_reader_that_reconnects_with_last_event_id_misses_and_repeats_nothing(
    api: httpx.Client,
):
    task_id = submit(api, task="ask", prompt="Count the stars.", options={"max_new_tokens": 24})
    # Given a reader that read two deltas and lost its connection,
    first: list[Event] = []
    for event in events(api, task_id):
        if event.name == "delta":
            first.append(event)
            if len(first) == 2:
                break
    # when it reconnects with the last id it saw,
    rest = [e for e in events(api, task_id, last_event_id=first[-1].id) if e.name != "status"]
    # then the deltas continue exactly where it left off.
    deltas = first + [event for event in rest if event.name == "delta"]
    assert rest[-1].name == "end"
    assert [d.json()["seq"] for d in deltas] == list(range(len(deltas)))
    assert "".join(d.json()["text"] for d in deltas) == rest[-1].json()["text"]


def test_a_reader_that_comes_after_the_end_still_gets_everything(api: httpx.Client):
    task_id = submit(api, task="ask", prompt="Name a colour.", options={"max_new_tokens": 8})
    result = wait_for_result(api, task_id)

    late = list(events(api, task_id))

    assert late[0].json()["state"] == "SUCCESS"
    text = "".join(e.json()["text"] for e in late if e.name == "delta")
    assert text == result["text"] and late[-1].json() == result


def test_delete_of_a_finished_task_says_so_and_its_result_stands(api: httpx.Client):
    task_id = submit(api, task="ask", prompt="Name a shape.", options={"max_new_tokens": 4})
    result = wait_for_result(api, task_id)

    response = api.delete(f"/v1/tasks/{task_id}")

    assert response.status_code == 200
    assert response.json() == {"id": task_id, "status": "already_finished"}
    assert wait_for_result(api, task_id) == result


def test_delete_stops_a_running_task_which_keeps_its_text_so_far(api: httpx.Client):
    task_id = submit(api, task="ask", prompt="Tell an endless story.",
                     options={"max_new_tokens": ENDLESS})
    stream = events(api, task_id)
    for event in stream:
        if event.name == "delta":
            break  # it is generating
    response = api.delete(f"/v1/tasks/{task_id}")
    assert response.status_code == 202
    assert response.json() == {"id": task_id, "status": "cancel_requested"}

    end = next(event for event in stream if event.name == "end").json()
    assert end["state"] == "FAILURE" and end["error"]["code"] == "cancelled"
    assert end["text"]
    assert wait_for_result(api, task_id)["error"]["code"] == "cancelled"


def test_a_task_is_visible_only_to_the_key_that_queued_it(
    api: httpx.Client, gateway: GatewayProcess
):
    task_id = submit(api, task="ask", prompt="Mine.", options={"max_new_tokens": 2})
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for method, path in [
        ("GET", f"/v1/tasks/{task_id}"),
        ("GET", f"/v1/tasks/{task_id}/events"),
        ("DELETE", f"/v1/tasks/{task_id}"),
    ]:
        answer = httpx.request(method, gateway.url(path), headers=other)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
    assert wait_for_result(api, task_id)["state"] == "SUCCESS"


@pytest.mark.parametrize(
    "path", ["/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10", "/v1/tasks/not-an-id",
             "/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10/events"]
)
def test_an_unknown_task_is_not_found(api: httpx.Client, path: str):
    answer = api.get(path)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"task": "paint"}, "invalid_input", "task"),
        ({"task": "ask"}, "invalid_input", "prompt"),
        ({"task": "describe", "images": []}, "invalid_input", "images"),
        ({"task": "ask", "prompt": "x", "options": {"beam_width": 3}}, "invalid_input",
         "options.beam_width"),
        ({"task": "ask", "prompt": "x", "options": {"temperature": 9}}, "invalid_input",
         "temperature"),
        ({"task": "ask", "prompt": "<|image_1|>"}, "invalid_input", "prompt"),
        ({"task": "describe", "images": [{"url": "/etc/passwd"}]}, "invalid_input", "images[0]"),
        ({"task": "describe", "images": [{"url": "http://10.0.0.1/a.png"}]},
         "image_fetch_failed", "images[0]"),
        ({"task": "describe", "images": [{"data": "bm90IGFuIGltYWdl"}]}, "unsupported_image",
         "images[0]"),
        ({"task": "ask", "prompt": "x", "callback_url": "http://169.254.169.254/"},
         "invalid_input", "callback_url"),
        ({"task": "ask", "prompt": "x", "priority": "urgent"}, "invalid_input", "priority"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_queued(
    api: httpx.Client, module_redis: RedisServer, body: dict, code: str, param: str
):
    before = submitted_count(module_redis.url)
    answer = api.post("/v1/tasks", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        code, param, "invalid_request_error"
    )
    assert submitted_count(module_redis.url) == before


def test_neither_json_nor_multipart_is_unsupported(api: httpx.Client):
    answer = api.post("/v1/tasks", content=b"task=ask", headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415


def test_a_callback_url_receives_the_signed_result_from_the_worker(api: httpx.Client):
    receiver = WebhookReceiver()
    try:
        task_id = submit(
            api, task="ask", prompt="Say hi.", options={"max_new_tokens": 4},
            callback_url=receiver.url("/hooks/vq?token=t0k"),
        )
        (hook,) = receiver.wait_for(1)
    finally:
        receiver.close()
    assert documented_verifier()(WEBHOOK_SECRET, hook.headers["X-VQ-Signature"], hook.body)
    assert hook.headers["X-VQ-Task-Id"] == task_id
    assert json.loads(hook.body) | {"state": "SUCCESS"} == wait_for_result(api, task_id)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_readme_examples_work_from_node_with_plain_fetch(gateway: GatewayProcess):
    # The README's curl examples, step by step, in another language's HTTP client.
    script = Path(__file__).with_name("readme_examples.mjs")
    run = subprocess.run(
        ["node", str(script)],
        env={
            **os.environ,
            "VQ_GATEWAY": gateway.base_url,
            "VQ_API_KEY": API_KEY,
            "VQ_MODEL_NAME": MODEL,
            "IMAGE": str(IMAGES / "shapes_640x480.png"),
        },
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["models"] == [MODEL]
    assert report["completion"]["object"] == "chat.completion"
    assert report["streamed"] == report["streamed_task_text"]
    assert report["task"]["state"] == "SUCCESS"
    assert report["events"][0] == "status" and report["events"][-1] == "end"
    assert report["unauthorized"] == 401
