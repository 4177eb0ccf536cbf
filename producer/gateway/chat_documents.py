"""PDFs in chat requests: an OpenAI `file` content part becomes the prompt's page images.

`{"type": "file", "file": {"filename": ..., "file_data": "data:application/pdf;base64,..."}}`
is checked as the task API checks a document (`vision_queue.documents.check_pdf`), and its
pages are drawn here, in the gateway (in a child process per request, bounded in time and
pixels: vision_queue/pdf_render.py), never on the event loop. Its pages count against the
request's image cap (the worker reduces crops for several images as for any); a longer
document is refused with a pointer to the task API, which runs pages as tasks of their own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vision_queue.documents import check_pdf, decode_base64_document, page_limits
from vision_queue.errors import InvalidInput, VisionQueueError
from vision_queue.pdf_render import render_pages
from vision_queue.settings import Settings


def document_pages(
    file_data: str, where: str, images_so_far: int, settings: Settings
) -> list[bytes]:
    """The pages of the PDF in `file_data`, drawn as PNG bytes; coded errors naming `where`."""
    try:
        data = decode_base64_document(file_data, settings.document_max_bytes, field=where)
        pages = check_pdf(data, settings)
        room = settings.max_images - images_so_far
        if pages > room:
            raise InvalidInput(
                f"the PDF has {pages} pages and this request takes at most {room} more "
                f"images (VQ_MAX_IMAGES={settings.max_images}); send longer documents to "
                "POST /v1/tasks with a document, which runs each page as a task",
                field=where,
            )
        with tempfile.TemporaryDirectory(prefix="vq-chat-pdf-") as folder:
            path = Path(folder) / "document.pdf"
            path.write_bytes(data)
            drawn = render_pages(str(path), pages, page_limits(settings))
    except VisionQueueError as exc:
        exc.field = where
        raise
    images: list[bytes] = []
    for page in drawn:
        if isinstance(page, VisionQueueError):
            page.field = where
            raise page
        images.append(page)
    return images
