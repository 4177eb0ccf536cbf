"""Submitting a PDF: checked here, before anything is queued; rendered by the workers.

`submit(..., document=...)` reads the PDF (a path, bytes or a binary file), checks it
(`vision_queue.documents.check_pdf`: not a PDF, truncated, damaged, encrypted, no pages, too
many, too large; a coded `invalid_document`), stages its bytes under their SHA-256 and
queues one document job. An http(s) URL is checked like an image URL (no internal
addresses) and queued as it is: a worker downloads the PDF and checks the bytes it got,
so those refusals end the document (coded) rather than the call. The pages are drawn on a
worker (CPU, in a child process), not in the client's process: a web backend never runs
pdfium's drawing code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

from producer import idempotency
from producer.envelope import Envelope, Outgoing
from producer.submission import Draft, SubmitRequest, prepare
from vision_queue.addresses import check_url, check_url_length
from vision_queue.documents import (
    DOCUMENT_TASK,
    check_document_task,
    check_max_failed_pages,
    check_pdf,
    document_message,
)
from vision_queue.errors import ImageFetchFailed, InvalidDocument, InvalidInput
from vision_queue.image_refs import RefKind, ref_kind
from vision_queue.images import ImageLimits
from vision_queue.protocol import STAGED_IMAGE_KEY
from vision_queue.schemas import ImageRef, ImageSource
from vision_queue.settings import Settings

# What `submit(document=...)` accepts: PDF bytes, an http(s) URL, a local path, or a binary
# file object.
DocumentInput = bytes | str | os.PathLike[str] | BinaryIO


def read_document(document: Any, settings: Settings, local_files: bool = True) -> bytes:
    """The PDF's bytes, at most VQ_DOCUMENT_MAX_BYTES of them read."""
    cap = settings.document_max_bytes
    if isinstance(document, (bytes, bytearray, memoryview)):
        return bytes(document)
    if isinstance(document, (str, os.PathLike)):
        if not local_files:
            raise InvalidInput("this client takes no paths", field="document")
        path = os.fspath(document)
        try:
            with Path(path).open("rb") as file:
                data = file.read(cap + 1)
        except OSError as exc:
            raise InvalidDocument(
                f"{path[-200:]}: cannot be read ({exc.strerror or type(exc).__name__})",
                field="document",
            ) from None
        return data
    read = getattr(document, "read", None)
    if callable(read):
        data = read(cap + 1)
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
    raise InvalidInput("document must be PDF bytes, a path or a binary file", field="document")


def document_url(document: Any, settings: Settings, local_files: bool = True) -> str | None:
    """The URL when `document` is an http(s) URL (checked: no internal address), else None."""
    if not isinstance(document, str):
        return None
    if ref_kind(document, "document", allow_path=local_files) is not RefKind.URL:
        return None
    check_url_length(document, "document")
    try:
        check_url(document, settings.private_host_allowlist)
    except ImageFetchFailed as exc:
        exc.field = "document"
        raise
    return document


def document_for_key(document: Any, settings: Settings, local_files: bool = True) -> bytes | str:
    """The document as an idempotency fingerprint sees it: its URL, or its bytes (a path or
    file is read once here, fingerprinted by content and then submitted from those bytes)."""
    url = document_url(document, settings, local_files)
    return url if url is not None else read_document(document, settings, local_files)


def document_fingerprint(request: SubmitRequest, given: bytes | str, max_failed: int) -> str:
    """What an idempotency key remembers of a document submit: the request, the PDF's
    bytes or URL (`document_for_key`) and `max_failed_pages`."""
    return idempotency.fingerprint([idempotency.request_fingerprint(request), given, max_failed])


def prepare_document(
    request: SubmitRequest,
    document: Any,
    max_failed_pages: int,
    settings: Settings,
    limits: ImageLimits,
    local_files: bool = True,
) -> tuple[Draft, bytes | None, int]:
    """Check everything (request rules first, then the PDF); nothing is written here.

    A PDF by URL comes back as (draft, None, 0): its bytes and page count are the worker's
    to get and check."""
    if request.images:
        raise InvalidInput("give either images or a document, not both", field="document")
    check_max_failed_pages(max_failed_pages)
    url = document_url(document, settings, local_files)
    if url is not None:
        by_url = ImageRef(ImageSource.URL, url)
        draft = prepare(
            SubmitRequest(**{**request.__dict__, "images": (by_url,)}),
            settings,
            limits,
            local_files,
        )
        check_document_task(draft.task)
        return draft, None, 0
    data = read_document(document, settings, local_files)
    digest = hashlib.sha256(data).hexdigest()
    staged = ImageRef(ImageSource.STAGED, digest)
    draft = prepare(
        SubmitRequest(**{**request.__dict__, "images": (staged,)}), settings, limits, local_files
    )
    check_document_task(draft.task)
    pages = check_pdf(data, settings)
    return draft, data, pages


def document_outgoing(
    envelope: Envelope, draft: Draft, data: bytes | None, pages: int, max_failed_pages: int
) -> Outgoing:
    """Everything one document job writes: the staged PDF (none for a URL) and the job's
    message."""
    pdf = draft.images[0]
    assert isinstance(pdf, ImageRef)
    staged = () if data is None else ((STAGED_IMAGE_KEY.format(digest=pdf.ref), data),)
    return envelope.outgoing_request(
        draft,
        (pdf,),
        staged,
        lambda request: document_message(request, pages, draft.priority, max_failed_pages),
        celery_name=DOCUMENT_TASK,
    )
