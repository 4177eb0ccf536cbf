"""PDF documents through the native task API: JSON base64 and multipart, on a real gateway."""

from __future__ import annotations

import base64

import httpx
import pytest
from gateway_support import wait_for_result
from support.pdfs import chromium_pdf, encrypted_pdf, pillow_pdf

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
