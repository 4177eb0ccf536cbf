"""PDF documents through the native task API: JSON base64 and multipart, on a real gateway."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_support import (
    API_KEY,
    MODEL,
    WEBHOOK_SECRET,
    GatewayProcess,
    read_events,
    wait_for_result,
)
from support.http_server import Route, serve
from support.pdfs import (
    chromium_pdf,
    drawing_children,
    encrypted_pdf,
    endless_page_pdf,
    pillow_pdf,
)
from support.redis_server import RedisServer
from support.webhook_receiver import WebhookReceiver, documented_verifier

from vision_queue.pdf_render import least_page_memory

pytestmark = pytest.mark.timeout(300)


def test_a_json_document_runs_as_one_task_with_its_pages(api: httpx.Client, tmp_path):
    pdf = chromium_pdf("<h1>Invoice 42</h1><p>Total: 17 EUR</p>", tmp_path)
    data = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    response = api.post("/v1/tasks", json={"task": "ocr", "document": {"data": data}})
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    result = wait_for_result(api, task_id, timeout_s=240)
    assert result["state"] == "SUCCESS", result
    assert result["pages_total"] == 1 and [p["page"] for p in result["pages"]] == [1]
    assert result["text"] == result["pages"][0]["text"]


def test_a_multipart_document_with_allowed_failures(api: httpx.Client):
    files = {"document": ("report.pdf", pillow_pdf(2), "application/pdf")}
    response = api.post("/v1/tasks", data={"task": "ocr", "max_failed_pages": "1"}, files=files)
    assert response.status_code == 202, response.text
    result = wait_for_result(api, response.json()["id"], timeout_s=240)
    assert result["state"] == "SUCCESS", result
    assert [p["state"] for p in result["pages"]] == ["SUCCESS", "SUCCESS"]
    assert "\n\n--- page 2 ---\n\n" in result["text"]


def test_a_json_document_by_url_is_downloaded_by_a_worker(api: httpx.Client):
    routes = {"/scan.pdf": Route(body=pillow_pdf(2), content_type="application/pdf")}
    with serve(routes) as server:
        body = {"task": "ocr", "document": {"url": server.url("/scan.pdf")}}
        response = api.post("/v1/tasks", json=body)
        assert response.status_code == 202, response.text
        result = wait_for_result(api, response.json()["id"], timeout_s=240)
    assert result["state"] == "SUCCESS", result.get("error")
    assert [page["page"] for page in result["pages"]] == [1, 2]
    assert server.requests == ["/scan.pdf"]


def test_the_documents_events_carry_each_pages_text_with_its_page(api: httpx.Client):
    body = {
        "task": "ask",
        "prompt": "Read this page aloud.",
        "options": {"max_new_tokens": 16},
        "document": {"data": base64.b64encode(pillow_pdf(2)).decode()},
    }
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    with api.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
        assert stream.status_code == 200
        events = list(read_events(stream.iter_lines()))
    deltas = [event.json() for event in events if event.name == "delta"]
    ends = [event.json() for event in events if event.name == "end"]
    assert len(ends) == 1 and events[-1].name == "end"
    result = ends[0]
    assert result["state"] == "SUCCESS" and result["pages_total"] == 2
    for page in result["pages"]:
        streamed = "".join(d["text"] for d in deltas if d["page"] == page["page"])
        assert streamed == page["text"] != ""
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ({"url": "http://169.254.169.254/latest/meta-data/x.pdf"}, "image_fetch_failed"),
        ({"url": "http://10.1.2.3/report.pdf"}, "image_fetch_failed"),
        ({"url": "file:///etc/passwd"}, "invalid_input"),
        ({"url": "https://docs.example/a.pdf", "data": "JVBERi0="}, "invalid_input"),
        ({}, "invalid_input"),
    ],
)
def test_a_document_url_that_is_refused_is_a_400_naming_the_document(
    api: httpx.Client, document, code
):
    response = api.post("/v1/tasks", json={"task": "ocr", "document": document})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "document")


@pytest.mark.parametrize("kind", ["not-pdf", "truncated", "encrypted"])
def test_an_unusable_pdf_is_a_400_before_anything_is_queued(api: httpx.Client, tmp_path, kind):
    pdf = {
        "not-pdf": lambda: b"GIF89a not a pdf",
        "truncated": lambda: pillow_pdf(2)[:-200],
        "encrypted": lambda: encrypted_pdf(pillow_pdf(1), tmp_path),
    }[kind]()
    body = {"task": "ocr", "document": {"data": base64.b64encode(pdf).decode()}}
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_document"


def test_a_documents_webhook_fires_once_for_the_whole_document(api: httpx.Client):
    receiver = WebhookReceiver()
    try:
        body = {
            "task": "ocr",
            "document": {"data": base64.b64encode(pillow_pdf(3)).decode()},
            "callback_url": receiver.url("/hooks/doc"),
        }
        response = api.post("/v1/tasks", json=body)
        assert response.status_code == 202, response.text
        task_id = response.json()["id"]
        result = wait_for_result(api, task_id, timeout_s=240)
        (hook,) = receiver.wait_for(1)
        time.sleep(2)  # no page sends one of its own, now or a little later
        assert len(receiver.hooks) == 1
    finally:
        receiver.close()
    assert documented_verifier()(WEBHOOK_SECRET, hook.headers["X-VQ-Signature"], hook.body)
    assert hook.headers["X-VQ-Task-Id"] == task_id
    sent = json.loads(hook.body)
    assert [page["page"] for page in sent["pages"]] == [1, 2, 3]
    assert sent | {"state": result["state"]} == result


def file_part(pdf: bytes) -> dict:
    data = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    return {"type": "file", "file": {"filename": "report.pdf", "file_data": data}}


def test_a_pdf_file_part_becomes_the_prompts_page_images(gateway: GatewayProcess, api):
    with openai.OpenAI(
        base_url=gateway.url("/v1"), api_key=API_KEY, max_retries=0, timeout=240
    ) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Transcribe this document."},
                        file_part(pillow_pdf(2)),
                    ],
                }
            ],
            max_tokens=6,
        )
        completion = raw.parse()
        stored = api.get(f"/v1/tasks/{raw.headers['x-task-id']}").json()
        assert stored["state"] == "SUCCESS"
        assert completion.choices[0].message.content == stored["text"]
        # Two page images in the prompt: more prompt tokens than one page alone.
        one = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [file_part(pillow_pdf(1))]}],
            max_tokens=1,
        )
        assert completion.usage is not None and one.usage is not None
        assert completion.usage.prompt_tokens > one.usage.prompt_tokens

        # A document longer than the request's image cap goes to the task API.
        with pytest.raises(openai.BadRequestError, match="/v1/tasks"):
            sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": [file_part(pillow_pdf(9))]}],
                max_tokens=1,
            )
        with pytest.raises(openai.BadRequestError, match="truncated"):
            sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": [file_part(pillow_pdf(1)[:-100])]}],
                max_tokens=1,
            )


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_the_gateway_draws_at_most_its_share_of_chat_pdfs_at_once(
    module_redis: RedisServer, tmp_path
):
    # Given a gateway that draws one chat PDF at a time, and three requests at once whose
    # page grows the drawing child until its memory bound stops it
    env = {
        "VQ_DOCUMENT_RENDERS": "1",
        "VQ_MAX_IMAGE_PIXELS": "1000000",
        "VQ_DOCUMENT_PAGE_MEMORY_BYTES": str(least_page_memory(1_000_000)),
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [file_part(endless_page_pdf())]}],
        "max_tokens": 1,
    }
    with GatewayProcess(module_redis.url, tmp_path, **env) as gateway:
        assert gateway.process is not None
        answers: list[httpx.Response] = []

        def ask() -> None:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            answers.append(
                httpx.post(gateway.url("/v1/chat/completions"), json=body, headers=headers,
                           timeout=120)
            )

        askers = [threading.Thread(target=ask) for _ in range(3)]
        for asker in askers:
            asker.start()
        most = 0
        while any(asker.is_alive() for asker in askers):
            most = max(most, len(drawing_children(gateway.process.pid)))
            time.sleep(0.02)
    # Then each is answered with its page's coded error, and never were two drawn at once
    errors = [answer.json()["error"] for answer in answers]
    assert [error["code"] for error in errors] == ["invalid_document"] * 3
    assert all("VQ_DOCUMENT_PAGE_MEMORY_BYTES" in error["message"] for error in errors)
    assert most == 1
