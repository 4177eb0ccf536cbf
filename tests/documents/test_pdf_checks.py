"""PDF checks before queuing, bounded page drawing, and joining pages into one result."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from support.pdfs import (
    chromium_pdf,
    encrypted_pdf,
    endless_page_pdf,
    enormous_page_pdf,
    pillow_pdf,
)

from vision_queue.documents import check_pdf
from vision_queue.errors import InvalidDocument, TaskTimeout
from vision_queue.pdf_render import render_page
from vision_queue.settings import Settings
from worker.document_join import join_pages, page_entry

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env({}, document_max_pages=5, document_max_bytes=1_000_000)


def test_a_page_printed_by_chromium_is_a_one_page_pdf(settings, tmp_path):
    data = chromium_pdf("<h1>Invoice 42</h1><p>Total: 17 EUR</p>", tmp_path)
    assert check_pdf(data, settings) == 1


def test_pillow_pdfs_count_their_pages(settings):
    assert check_pdf(pillow_pdf(3), settings) == 3


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: b"\x89PNG\r\n\x1a\n" + b"0" * 100, "not a PDF"),
        (lambda tmp: pillow_pdf(2)[:-300], "truncated"),
        (lambda tmp: pillow_pdf(6), "VQ_DOCUMENT_MAX_PAGES=5"),
        (lambda tmp: b"%PDF-1.7\n" + b"0" * 1_000_001, "VQ_DOCUMENT_MAX_BYTES=1000000"),
        (lambda tmp: b"%PDF-1.7\nthis is no PDF at all\n%%EOF\n", "damaged"),
        (lambda tmp: encrypted_pdf(pillow_pdf(1), tmp), "encrypted"),
        (lambda tmp: encrypted_pdf(pillow_pdf(1), tmp, user_password=""), "encrypted"),
    ],
    ids=["png", "truncated", "too-many-pages", "too-large", "damaged", "encrypted", "owner-only"],
)
def test_unusable_pdfs_are_refused_with_a_code(settings, tmp_path, make, words):
    with pytest.raises(InvalidDocument) as caught:
        check_pdf(make(tmp_path), settings)
    assert caught.value.code.value == "invalid_document"
    assert words in caught.value.message


def test_zero_pages_is_refused(settings):
    from support.pdfs import raw_pdf

    with pytest.raises(InvalidDocument, match="no pages"):
        check_pdf(raw_pdf([]), settings)


def test_a_200_inch_page_is_drawn_scaled_down_to_the_pixel_cap(tmp_path):
    path = tmp_path / "big.pdf"
    path.write_bytes(enormous_page_pdf())
    png = render_page(str(path), 0, dpi=150, max_pixels=1_000_000, time_limit_s=60)
    width, height = Image.open(io.BytesIO(png)).size
    assert width * height <= 1_000_000 and width > 900


def test_a_page_whose_drawing_never_ends_is_stopped_at_the_time_limit(tmp_path):
    path = tmp_path / "endless.pdf"
    path.write_bytes(endless_page_pdf())
    with pytest.raises(TaskTimeout, match="VQ_DOCUMENT_PAGE_TIME_LIMIT_S=2s"):
        render_page(str(path), 0, dpi=150, max_pixels=1_000_000, time_limit_s=2)


def _page(n: int, state: str, text: str = "", error: str | None = None) -> dict:
    result = {"id": f"p{n}", "text": text, "usage": {"prompt_tokens": 10, "completion_tokens": n}}
    if error:
        result["error"] = {"code": error, "message": "x"}
    return page_entry(n, state, result)


def test_pages_join_in_order_with_summed_usage():
    meta = {"task": "ocr", "max_failed_pages": 0, "submitted_at": 1.0, "started_at": 2.0}
    entries = [_page(2, "SUCCESS", "two"), _page(1, "SUCCESS", "one")]
    state, result = join_pages("d", meta, entries, cancelled=False)
    assert state == "SUCCESS"
    assert [p["page"] for p in result["pages"]] == [1, 2]
    assert result["text"] == "one\n\n--- page 2 ---\n\ntwo"
    assert result["usage"] == {"prompt_tokens": 20, "completion_tokens": 3}


def test_more_failed_pages_than_allowed_fail_the_document_listing_every_page():
    meta = {"task": "ocr", "max_failed_pages": 1}
    entries = [_page(1, "SUCCESS", "a"), _page(2, "FAILURE", error="timeout"), _page(3, "FAILURE")]
    state, result = join_pages("d", meta, entries, cancelled=False)
    assert state == "FAILURE" and result["error"]["code"] == "document_failed"
    assert [p["state"] for p in result["pages"]] == ["SUCCESS", "FAILURE", "FAILURE"]
    assert result["pages"][1]["error"]["code"] == "timeout"
    state, _ = join_pages("d", {**meta, "max_failed_pages": 2}, entries, cancelled=False)
    assert state == "SUCCESS"


def test_a_cancelled_document_keeps_the_pages_done():
    entries = [_page(1, "SUCCESS", "a"), _page(2, "CANCELLED")]
    state, result = join_pages("d", {"task": "ocr"}, entries, cancelled=True)
    assert state == "REVOKED" and result["error"]["code"] == "cancelled"
    assert result["pages"][0]["text"] == "a"
