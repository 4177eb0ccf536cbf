"""PDF checks before queuing, bounded page drawing, and joining pages into one result."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from support.pdfs import (
    chromium_pdf,
    drawing_children,
    encrypted_pdf,
    endless_page_pdf,
    enormous_page_pdf,
    pillow_pdf,
)

from vision_queue.documents import check_pdf
from vision_queue.errors import InvalidDocument, TaskTimeout
from vision_queue.pdf_render import PageLimits, least_page_memory, render_page
from vision_queue.settings import Settings
from worker.document_join import join_pages, page_entry

pytestmark = pytest.mark.timeout(180)


def limits(
    time_limit_s: float, max_pixels: int = 1_000_000, memory_bytes: int | None = None
) -> PageLimits:
    """150 dpi; the least memory bound allowed for `max_pixels` unless told."""
    memory = least_page_memory(max_pixels) if memory_bytes is None else memory_bytes
    return PageLimits(150, max_pixels, time_limit_s, memory)


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
    png = render_page(str(path), 0, limits(time_limit_s=60))
    width, height = Image.open(io.BytesIO(png)).size
    assert width * height <= 1_000_000 and width > 900


def test_a_page_whose_drawing_never_ends_is_stopped_at_the_time_limit(tmp_path):
    path = tmp_path / "endless.pdf"
    path.write_bytes(endless_page_pdf())
    with pytest.raises(TaskTimeout, match="VQ_DOCUMENT_PAGE_TIME_LIMIT_S=2s"):
        render_page(str(path), 0, limits(time_limit_s=2, memory_bytes=16 * 1024**3))


def test_a_page_that_needs_more_memory_than_the_bound_fails_coded_long_before_the_time_limit(
    tmp_path,
):
    # The endless page grows pdfium's memory by hundreds of MB a second: the address space
    # bound stops it, far sooner than the time limit would.
    path = tmp_path / "endless.pdf"
    path.write_bytes(endless_page_pdf())
    with pytest.raises(InvalidDocument, match="VQ_DOCUMENT_PAGE_MEMORY_BYTES") as caught:
        render_page(str(path), 0, limits(time_limit_s=120))
    assert caught.value.field == "document"


def test_a_page_at_the_pixel_cap_draws_within_the_least_memory_bound_allowed(tmp_path):
    path = tmp_path / "big.pdf"
    path.write_bytes(enormous_page_pdf())
    png = render_page(str(path), 0, limits(max_pixels=4_000_000, time_limit_s=60))
    width, height = Image.open(io.BytesIO(png)).size
    assert 3_900_000 < width * height <= 4_000_000


_DRAW_FOREVER = """
import sys
from vision_queue.pdf_render import PageLimits, render_page
render_page(sys.argv[1], 0, PageLimits(72, 1_000_000, 600.0, 16 * 1024**3))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_the_drawing_child_exits_when_its_parent_is_killed(tmp_path):
    # Given a process drawing a page that never ends (the time limit far away)
    path = tmp_path / "endless.pdf"
    path.write_bytes(endless_page_pdf())
    parent = subprocess.Popen([sys.executable, "-c", _DRAW_FOREVER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not (children := drawing_children(parent.pid)):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = children[0]
    finally:
        # When that process is killed (no cleanup runs)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    # Then its drawing child exits too, instead of drawing on as an orphan
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child}").exists() and _state(child) != "Z":
        assert time.monotonic() < deadline, "the drawing child outlived its parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


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
