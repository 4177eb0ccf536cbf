"""Documents: a PDF that runs as one job of pages. What the producer and the worker agree on.

A client checks the PDF (`check_pdf`) before anything is queued, stages its bytes like an
image (under their SHA-256) and queues one `DOCUMENT_TASK` whose request is
`document_message`'s. A PDF given by URL is queued with its URL and a page count of 0
(unknown): the worker downloads it (the guarded fetch images use, capped at
VQ_DOCUMENT_MAX_BYTES) and applies every check to the bytes it got.

A worker renders the pages (worker/documents.py), stages each page image, writes the
document's record (`DOCUMENT_KEY`, a hash) and queues one ordinary task of the document's
task per page, marked with `PAGE_FIELD`; the last page to end writes the document's result
under the document's own id, so status, result, wait and webhooks read it like any task's.
"""

from __future__ import annotations

import base64
import binascii
import threading
from dataclasses import dataclass
from typing import Any

from vision_queue.errors import InvalidDocument, InvalidInput
from vision_queue.pdf_render import PageLimits
from vision_queue.protocol import KEY_PREFIX, Priority, TaskName
from vision_queue.schemas import (
    ImageRef,
    ImageSource,
    TaskRequest,
    parse_priority,
    parse_request,
    preview,
)
from vision_queue.settings import Settings

DOCUMENT_TASK = "vision_queue.document"
# The tasks a document can run on each page (compare needs several images per prompt).
DOCUMENT_TASKS = (TaskName.OCR, TaskName.DESCRIBE, TaskName.ASK)
# The document's record: a hash of `total`, `done`, `ids` (JSON list of page task ids),
# `meta` (JSON: task, max_failed_pages, callback_url, submitted_at, started_at) and one
# `page:<n>` field per ended page (JSON: state and result). Expires with the results.
DOCUMENT_KEY = KEY_PREFIX + ":doc:{doc_id}"
# Beside a document's events stream (results Redis): the next entry's `seq`, how many
# characters of each page's text are in the stream (`p<n>`), and `ended` (worker side:
# worker/delivery/document_stream.py). Delta entries of a document carry `page`.
DOCUMENT_STREAM_STATE_KEY = KEY_PREFIX + ":doc:{doc_id}:stream"
# The field of a page task's request that names its document: {"id": ..., "page": n}.
PAGE_FIELD = "document_page"
# Between the texts of two pages in the document's `text`.
PAGE_SEPARATOR = "\n\n--- page {page} ---\n\n"
MAX_FAILED_PAGES_LIMIT = 10_000
# What a document's result adds to a task's (worker/document_join.py).
DOCUMENT_RESULT_FIELDS = ("pages", "pages_total", "pages_done", "pages_failed")

# pdfium is not thread-safe: every call into it in this process holds this lock.
PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class DocumentRequest:
    """A document job: the task each page runs, the staged PDF and how pages may fail."""

    request: TaskRequest  # the task, prompt, options; its one image is the PDF (staged or URL)
    pages: int  # 0 for a PDF by URL: counted once it is downloaded
    priority: Priority
    max_failed_pages: int

    @property
    def pdf(self) -> ImageRef:
        return self.request.images[0]


def document_message(
    request: TaskRequest, pages: int, priority: Priority, max_failed_pages: int
) -> dict[str, Any]:
    """The wire form of a document job (`request.images` holds the PDF only: staged, or a
    URL with `pages` 0)."""
    message = request.to_message()
    message["document"] = {
        "pages": pages,
        "priority": priority.value,
        "max_failed_pages": max_failed_pages,
    }
    return message


def parse_document(message: Any, settings: Settings) -> DocumentRequest:
    """Validate a document job's message (the worker does, again)."""
    if not isinstance(message, dict) or not isinstance(message.get("document"), dict):
        raise InvalidInput("a document job needs its document object", field="document")
    request = parse_request(message, settings)
    if request.task not in DOCUMENT_TASKS:
        raise InvalidInput(f"documents run {task_list()}", field="task")
    sources = (ImageSource.STAGED, ImageSource.URL)
    if len(request.images) != 1 or request.images[0].source not in sources:
        raise InvalidInput("a document job names one staged PDF or its URL", field="document")
    info = message["document"]
    pages = info.get("pages")
    if not isinstance(pages, int) or isinstance(pages, bool):
        raise InvalidInput("document pages must be a count", field="document")
    if request.images[0].source is ImageSource.STAGED or pages != 0:
        check_page_count(pages, settings)
    return DocumentRequest(
        request,
        pages,
        parse_priority(info.get("priority")),
        check_max_failed_pages(info.get("max_failed_pages", 0)),
    )


def check_max_failed_pages(value: Any) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_FAILED_PAGES_LIMIT
    ):
        raise InvalidInput(
            f"max_failed_pages must be an integer from 0 to {MAX_FAILED_PAGES_LIMIT}, "
            f"got {preview(value)}",
            field="max_failed_pages",
        )
    return value


def check_document_task(task: TaskName) -> None:
    if task not in DOCUMENT_TASKS:
        raise InvalidInput(
            f"{task.value} does not take a document; documents run {task_list()}",
            field="document",
        )


def task_list() -> str:
    return ", ".join(task.value for task in DOCUMENT_TASKS)


def check_page_count(pages: int, settings: Settings) -> None:
    if pages < 1:
        raise InvalidDocument("the PDF has no pages", field="document")
    if pages > settings.document_max_pages:
        raise InvalidDocument(
            f"the PDF has {pages} pages, more than VQ_DOCUMENT_MAX_PAGES="
            f"{settings.document_max_pages}",
            field="document",
        )


def page_limits(settings: Settings) -> PageLimits:
    """How this process draws PDF pages (VQ_DOCUMENT_DPI, VQ_MAX_IMAGE_PIXELS,
    VQ_DOCUMENT_PAGE_TIME_LIMIT_S, VQ_DOCUMENT_PAGE_MEMORY_BYTES)."""
    return PageLimits(
        settings.document_dpi,
        settings.max_image_pixels,
        settings.document_page_time_limit_s,
        settings.document_page_memory_bytes,
    )


def check_pdf(data: bytes, settings: Settings) -> int:
    """The page count of a usable PDF; a coded `invalid_document` error otherwise.

    Refused: over VQ_DOCUMENT_MAX_BYTES, not a PDF (magic bytes), truncated (no end
    marker), damaged (pdfium cannot open it), encrypted (passwords are not supported), no
    pages, more than VQ_DOCUMENT_MAX_PAGES. Opening reads the cross-reference table and
    the page tree only; no page is drawn.
    """
    if len(data) > settings.document_max_bytes:
        raise InvalidDocument(
            f"the PDF has {len(data)} bytes, more than VQ_DOCUMENT_MAX_BYTES="
            f"{settings.document_max_bytes}",
            field="document",
        )
    if b"%PDF-" not in bytes(data[:1024]):
        raise InvalidDocument("not a PDF (no %PDF- header)", field="document")
    if b"%%EOF" not in bytes(data[-2048:]):
        raise InvalidDocument("the PDF is truncated (no %%EOF end marker)", field="document")
    import pypdfium2 as pdfium  # here: a client that never sends a PDF never loads pdfium

    with PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(bytes(data))
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower() and b"/Encrypt" in data:
                raise InvalidDocument(
                    "the PDF is encrypted; password-protected PDFs are not supported",
                    field="document",
                ) from None
            # pdfium also refuses a page tree without pages (as a "password" error).
            raise InvalidDocument(
                f"the PDF is damaged or has no pages ({str(exc)[:120]})", field="document"
            ) from None
        try:
            if pdfium.raw.FPDF_GetSecurityHandlerRevision(pdf.raw) != -1:
                raise InvalidDocument(
                    "the PDF is encrypted; encrypted PDFs are not supported (no passwords)",
                    field="document",
                )
            pages = len(pdf)
        finally:
            pdf.close()
    check_page_count(pages, settings)
    return pages


def decode_base64_document(text: Any, max_bytes: int, field: str = "document") -> bytes:
    """PDF bytes from raw base64 or a `data:application/pdf;base64,` URI; strict, and the
    byte cap is checked before anything is decoded."""
    if not isinstance(text, str):
        raise InvalidInput("document data must be a base64 string", field=field)
    payload = text.strip()
    if payload[:5].lower() == "data:":
        head, sep, rest = payload.partition(",")
        params = [part.strip().lower() for part in head[5:].split(";")]
        if not sep or params[0] != "application/pdf" or "base64" not in params[1:]:
            raise InvalidInput(
                "document data URI must be data:application/pdf;base64,...", field=field
            )
        payload = rest
    payload = "".join(payload.split())
    if not payload:
        raise InvalidInput("document data is empty", field=field)
    if (len(payload) // 4) * 3 - 2 > max_bytes:
        raise InvalidDocument(
            f"the PDF is larger than VQ_DOCUMENT_MAX_BYTES={max_bytes}", field=field
        )
    try:
        return base64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput("document data is not valid base64", field=field) from None


def page_marker(message: Any) -> tuple[str, int] | None:
    """The (document id, page) a page task's request names, else None."""
    if not isinstance(message, dict):
        return None
    marker = message.get(PAGE_FIELD)
    if not isinstance(marker, dict):
        return None
    doc_id, page = marker.get("id"), marker.get("page")
    if not isinstance(doc_id, str) or len(doc_id) > 64:
        return None
    if not isinstance(page, int) or isinstance(page, bool) or not 1 <= page <= 100_000:
        return None
    return doc_id, page
