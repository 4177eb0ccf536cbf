"""A document job on the worker: draw its pages and fan them out as page tasks.

The `vision_queue.document` task gets the PDF (staged by the client, or downloaded from
its URL with the guarded fetch), checks it, writes the document's record and draws the
pages in a child process (bounded in time and pixels: vision_queue/pdf_render.py). Each
page is staged like an uploaded image and queued as an ordinary task (same task, options
and priority, marked with the document and page) as soon as it is drawn, while the child
draws the next: the first pages generate while the last are drawn. The task then ends:
nothing waits for the pages while holding a slot. Drawing happens here, on the worker's
CPU, so a web backend's process never parses a page's drawing.

The pages' outcomes and the join into the document's result: worker/document_pages.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Terminated

from vision_queue.documents import (
    DOCUMENT_TASK,
    PAGE_FIELD,
    DocumentRequest,
    check_pdf,
    page_limits,
    parse_document,
)
from vision_queue.errors import (
    Cancelled,
    ImageFetchFailed,
    ImageTooLarge,
    InvalidDocument,
    ModelError,
    TaskFailed,
    VisionQueueError,
)
from vision_queue.pdf_render import render_pages
from vision_queue.protocol import (
    STAGED_IMAGE_KEY,
    SUBMITTED_KEY,
    priority_queue,
)
from vision_queue.results import (
    TaskResult,
)
from vision_queue.schemas import ImageSource
from vision_queue.settings import Settings
from vision_queue.staging import load_staged_image
from worker.delivery.results import STORED
from worker.delivery.webhooks import notify_task_end
from worker.document_pages import (
    cancelled,
    empty_page,
    end_of_stream,
    record_key,
    record_page,
    report_progress,
)
from worker.fetch import fetch_image_bytes

# `runtime` below is worker.tasks.WorkerRuntime (not imported: tasks.py imports this module).
WorkerRuntime = Any
log = logging.getLogger("vision_queue.document")

def register_document_task(app: Celery, runtime: WorkerRuntime) -> None:
    def document(task: Task, *args: Any, **kwargs: Any) -> None:
        run_document(task, runtime, args, kwargs)

    app.task(
        bind=True,
        name=DOCUMENT_TASK,
        max_retries=None,
        ignore_result=True,
        throws=(TaskFailed, Terminated),
    )(document)


def run_document(
    task: Task, runtime: WorkerRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    doc_id: str = task.request.id
    started_at = time.time()
    if runtime.results.final_state(doc_id) is not None:
        raise Ignore()
    message = args[0] if len(args) == 1 and not kwargs else None
    task_value = str(message.get("task", "")) if isinstance(message, dict) else ""
    try:
        request = parse_document(message, runtime.settings)
        runtime.results.update(
            doc_id,
            DOCUMENT_TASK,
            "STARTED",
            {"pid": os.getpid(), "hostname": runtime.name},
            None,
            0,
        )
        data = _load_pdf(request, runtime)
        pages = check_pdf(data, runtime.settings)
        fan_out = _FanOut(task, doc_id, request, runtime, pages, started_at)
        fan_out.run(data)
    except (redis.RedisError, Ignore):
        raise
    except VisionQueueError as error:
        retries = int(task.request.retries or 0)
        settings = runtime.settings
        if error.transient and retries < settings.max_retries:
            # A PDF by URL whose server failed for now: fetched again later, like an image.
            log.info("document id=%s: %s; retrying", doc_id, error.code.value)
            backoff = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
            raise task.retry(exc=error, countdown=backoff) from None
        _store_document(runtime, doc_id, task_value, error, started_at, message)
    except Exception as exc:
        log.exception("document id=%s crashed", doc_id)
        crash = ModelError(f"internal error: {type(exc).__name__}")
        _store_document(runtime, doc_id, task_value, crash, started_at, message)


def _load_pdf(request: DocumentRequest, runtime: WorkerRuntime) -> bytes:
    if request.pdf.source is ImageSource.URL:
        return fetch_document(request.pdf.ref, runtime.settings)
    return load_staged_image(runtime.redis, request.pdf.ref)


def fetch_document(url: str, settings: Settings) -> bytes:
    """A PDF by URL: the guarded fetch images use (public addresses, redirects checked, one
    deadline), its body capped at VQ_DOCUMENT_MAX_BYTES; over the cap is invalid_document."""
    try:
        return fetch_image_bytes(url, settings, max_bytes=settings.document_max_bytes)
    except ImageTooLarge:
        raise InvalidDocument(
            f"the PDF is larger than VQ_DOCUMENT_MAX_BYTES={settings.document_max_bytes}",
            field="document",
        ) from None
    except ImageFetchFailed as exc:
        exc.field = "document"
        raise


# KEYS: the record. ARGV: ids (JSON), total, meta (JSON), expiry s. Writes the whole record
# at once unless an earlier delivery did (1 = written, 0 = it exists).
_OPEN_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'ids', ARGV[1], 'total', ARGV[2], 'done', 0, 'meta', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class _FanOut:
    """Draw a document's pages and queue each one as soon as it is drawn.

    The record (page count, page ids, meta) is written before the first page is queued, so
    a page that ends at once finds it. A page is queued as an ordinary task of the
    document's task, options and priority (it shares batch rows with every other task);
    a page that could not be drawn, or comes after a cancel, is recorded here instead.
    Each drawn page's digest goes into the record (`digest:<n>`): a document redelivered
    mid-fan-out (its worker died) queues again, under the same ids, every page not ended
    (a page already queued runs once more at most; the second copy stores nothing), and
    draws again only when some page was never drawn.
    """

    def __init__(
        self,
        task: Task,
        doc_id: str,
        request: DocumentRequest,
        runtime: WorkerRuntime,
        pages: int,
        started_at: float,
    ) -> None:
        self.task, self.doc_id, self.request, self.runtime = task, doc_id, request, runtime
        self.pages, self.started_at = pages, started_at
        self.client: redis.Redis = runtime.redis
        self.ttl = runtime.settings.result_expires_s
        self.key = record_key(doc_id)
        self.ids: list[str] = []
        self.ended: set[int] = set()
        self.stopped = False  # cancelled: the pages not queued yet are recorded, not queued
        self.queue = priority_queue(runtime.settings.queue, request.priority)
        message = request.request.to_message()
        message.pop("callback_url", None)  # the document's webhook fires once, for all pages
        self.message = message

    def run(self, data: bytes) -> None:
        digests = self._open_record()
        if all(n in digests for n in range(1, self.pages + 1) if n not in self.ended):
            # Redelivered after every page was drawn: nothing to draw again.
            for number, digest in sorted(digests.items()):
                self._page_drawn(number, digest)
            return
        settings = self.runtime.settings
        if cancelled(self.client, self.doc_id):
            raise Cancelled("cancelled by the client")
        with tempfile.TemporaryDirectory(prefix="vq-doc-") as folder:
            path = str(Path(folder) / "document.pdf")
            Path(path).write_bytes(data)
            with self.runtime.document_renders:
                render_pages(path, self.pages, page_limits(settings), on_page=self._on_page)
        log.info("document id=%s pages=%d queued", self.doc_id, self.pages)

    def _open_record(self) -> dict[int, str]:
        """Write the record, or read the one an earlier delivery wrote: {page: digest} of
        the pages already drawn (and `self.ended`, the pages already ended)."""
        ids = [str(uuid.uuid4()) for _ in range(self.pages)]
        meta = {
            "task": self.request.request.task.value,
            "max_failed_pages": self.request.max_failed_pages,
            "callback_url": self.request.request.callback_url,
            "submitted_at": self.request.request.submitted_at,
            "started_at": self.started_at,
        }
        args = (json.dumps(ids), self.pages, json.dumps(meta), self.ttl)
        if self.client.eval(_OPEN_RECORD, 1, self.key, *args):
            pipe = self.client.pipeline(transaction=False)
            for page_id in ids:  # known ids: a page's status reads PENDING until it starts
                task_name = self.request.request.task.value
                pipe.set(SUBMITTED_KEY.format(task_id=page_id), task_name, ex=self.ttl)
            pipe.execute()
            self.ids = ids
            report_progress(self.runtime, self.doc_id, 0, self.pages)
            return {}
        record = {_text(k): _text(v) for k, v in self.client.hgetall(self.key).items()}
        self.ids = json.loads(record["ids"])
        self.ended = {n for n in range(1, self.pages + 1) if f"page:{n}" in record}
        log.info("document id=%s redelivered: %d pages ended", self.doc_id, len(self.ended))
        numbers = range(1, self.pages + 1)
        return {n: record[f"digest:{n}"] for n in numbers if f"digest:{n}" in record}

    def _on_page(self, number: int, page: bytes | VisionQueueError) -> None:
        if number in self.ended:
            return
        if isinstance(page, VisionQueueError):
            log.info("document id=%s page=%d not drawn: %s", self.doc_id, number, page)
            failed = empty_page(self.ids[number - 1], self.request)
            failed["error"] = page.to_dict()
            record_page(self.runtime, self.doc_id, number, "FAILURE", failed)
            return
        digest = hashlib.sha256(page).hexdigest()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(STAGED_IMAGE_KEY.format(digest=digest), page, ex=self.ttl)
        pipe.hset(self.key, f"digest:{number}", digest)
        pipe.execute()
        self._page_drawn(number, digest)

    def _page_drawn(self, number: int, digest: str) -> None:
        if number in self.ended:
            return
        # A cancel between pages: the client may have read the record before this page
        # was queued, so a page not queued yet is recorded cancelled here.
        self.stopped = self.stopped or cancelled(self.client, self.doc_id)
        page_id = self.ids[number - 1]
        if self.stopped:
            record_page(
                self.runtime, self.doc_id, number, "CANCELLED", empty_page(page_id, self.request)
            )
            return
        message = {
            **self.message,
            "images": [{"source": "staged", "ref": digest}],
            PAGE_FIELD: {"id": self.doc_id, "page": number},
        }
        self.task.app.send_task(
            self.request.request.task.celery_name,
            args=[message],
            task_id=page_id,
            queue=self.queue,
        )


def _store_document(
    runtime: WorkerRuntime,
    doc_id: str,
    task_value: str,
    error: VisionQueueError,
    started_at: float,
    message: Any,
) -> None:
    """A document that failed (or was cancelled) before its pages were queued."""
    result = TaskResult(id=doc_id, task=task_value, worker=runtime.name)
    result.error = error.to_dict()
    result.timings.total = time.time() - started_at
    payload = result.to_dict()
    payload["pages"] = []
    state = "REVOKED" if isinstance(error, Cancelled) else "FAILURE"
    tail = end_of_stream(runtime, doc_id)
    stored = runtime.results.finish(doc_id, DOCUMENT_TASK, state, payload, None, 0, tail)
    log.info("document id=%s outcome=%s", doc_id, error.code.value)
    if stored == STORED:
        callback = message.get("callback_url") if isinstance(message, dict) else None
        notify_task_end(runtime.webhooks, ({"callback_url": callback},), payload, error.code.value)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
