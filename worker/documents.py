"""A document job on the worker: render its pages, fan them out, join their results.

The `vision_queue.document` task renders every page of the staged PDF (each in a child
process, bounded in time and pixels: vision_queue/pdf_render.py), stages each page image in
Redis like an uploaded image, writes the document's record and queues one ordinary task
per page (same task, options and priority, marked with the document and page). It then
ends: nothing waits for the pages while holding a slot. Rendering happens here, on the
worker's CPU, so a web backend's process never parses a page's drawing.

Each page task, once its own result is stored, reports to `page_ended` (worker/tasks.py):
a Lua script records its outcome once (a redelivered page counts once) and counts it; the
page that completes the count joins the pages into the document's result (`join_pages`)
and stores it under the document's id, so every existing reader works unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Terminated
from celery.worker import state as worker_state

from vision_queue.documents import (
    DOCUMENT_KEY,
    DOCUMENT_TASK,
    PAGE_FIELD,
    DocumentRequest,
    check_pdf,
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
    CANCEL_KEY,
    PROGRESS_STATE,
    STAGED_IMAGE_KEY,
    SUBMITTED_KEY,
    priority_queue,
)
from vision_queue.results import (
    TaskResult,
    decode_meta,
    failure_carried,
    is_final,
    result_key,
)
from vision_queue.schemas import ImageSource
from vision_queue.settings import Settings
from vision_queue.staging import load_staged_image
from worker.delivery.document_stream import (
    PageStreamWriter,
    close_document_stream,
    tee,
    write_page_rest,
)
from worker.delivery.results import STORED, StreamTail
from worker.delivery.streams import StreamWriter
from worker.delivery.webhooks import notify_task_end
from worker.document_join import join_pages, page_entry
from worker.fetch import fetch_image_bytes

# `runtime` below is worker.tasks.WorkerRuntime (not imported: tasks.py imports this module).
WorkerRuntime = Any
log = logging.getLogger("vision_queue.document")

# Records a page's outcome once and counts it: returns the pages ended so far, or -1 when
# this page had already been recorded (a redelivered page, or a second report).
_PAGE_ENDED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('HSETNX', KEYS[1], 'page:' .. ARGV[1], ARGV[2]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'done', 1)
"""


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


def record_key(doc_id: str) -> str:
    return DOCUMENT_KEY.format(doc_id=doc_id)


def run_document(
    task: Task, runtime: WorkerRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    doc_id: str = task.request.id
    started_at = time.time()
    client = runtime.redis
    if runtime.results.final_state(doc_id) is not None:
        raise Ignore()
    message = args[0] if len(args) == 1 and not kwargs else None
    if client.exists(record_key(doc_id)):
        # Redelivered after its record was written (its worker died while queuing the
        # pages): queue again every page not ended yet, under the same ids. A page already
        # queued runs once more at most; the second copy stores nothing (first writer wins).
        _requeue_pages(task, doc_id, parse_document(message, runtime.settings), runtime)
        return
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
        pages = _render_all(doc_id, request, runtime)
        _fan_out(task, doc_id, request, pages, runtime, started_at)
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


def _cancelled(client: redis.Redis, doc_id: str) -> bool:
    if doc_id in worker_state.revoked:
        return True
    with contextlib.suppress(redis.RedisError):
        return bool(client.exists(CANCEL_KEY.format(task_id=doc_id)))
    return False


def _render_all(
    doc_id: str, request: DocumentRequest, runtime: WorkerRuntime
) -> list[bytes | VisionQueueError]:
    """Every page as PNG bytes, or the coded error that page failed with."""
    settings = runtime.settings
    if request.pdf.source is ImageSource.URL:
        data = fetch_document(request.pdf.ref, settings)
    else:
        data = load_staged_image(runtime.redis, request.pdf.ref)
    count = check_pdf(data, settings)
    with tempfile.TemporaryDirectory(prefix="vq-doc-") as folder:
        path = str(Path(folder) / "document.pdf")
        Path(path).write_bytes(data)
        if _cancelled(runtime.redis, doc_id):
            raise Cancelled("cancelled by the client")
        pages = render_pages(
            path,
            count,
            settings.document_dpi,
            settings.max_image_pixels,
            settings.document_page_time_limit_s,
        )
    for number, page in enumerate(pages, start=1):
        if isinstance(page, VisionQueueError):
            log.info("document id=%s page=%d not drawn: %s", doc_id, number, page)
    return pages


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


def _fan_out(
    task: Task,
    doc_id: str,
    request: DocumentRequest,
    pages: list[bytes | VisionQueueError],
    runtime: WorkerRuntime,
    started_at: float,
) -> None:
    settings, client = runtime.settings, runtime.redis
    ttl = settings.result_expires_s
    ids = [str(uuid.uuid4()) for _ in pages]
    meta = {
        "task": request.request.task.value,
        "max_failed_pages": request.max_failed_pages,
        "callback_url": request.request.callback_url,
        "submitted_at": request.request.submitted_at,
        "started_at": started_at,
    }
    pipe = client.pipeline(transaction=False)
    digests: list[str | None] = []
    for page in pages:
        if isinstance(page, bytes):
            sha = hashlib.sha256(page).hexdigest()
            pipe.set(STAGED_IMAGE_KEY.format(digest=sha), page, ex=ttl)
            digests.append(sha)
        else:
            digests.append(None)
    for page_id in ids:  # known ids: a page's status reads PENDING until it starts
        pipe.set(SUBMITTED_KEY.format(task_id=page_id), request.request.task.value, ex=ttl)
    key = record_key(doc_id)
    pipe.hset(
        key,
        mapping={
            "total": len(pages),
            "done": 0,
            "ids": json.dumps(ids),
            "digests": json.dumps(digests),
        },
    )
    pipe.hset(key, "meta", json.dumps(meta))
    pipe.expire(key, ttl)
    pipe.execute()
    _report_progress(runtime, doc_id, 0, len(pages))
    if _cancelled(client, doc_id):
        # The client may have read the record before it was written: no page is queued.
        for number in range(1, len(pages) + 1):
            _record(runtime, doc_id, number, "CANCELLED", _empty(ids[number - 1], request))
        return
    for number, (digest, page) in enumerate(zip(digests, pages, strict=True), start=1):
        if digest is None:
            assert isinstance(page, VisionQueueError)
            failed = _empty(ids[number - 1], request)
            failed["error"] = page.to_dict()
            _record(runtime, doc_id, number, "FAILURE", failed)
    _queue_pages(task, doc_id, request, ids, digests, settings.queue, skip=set())
    log.info("document id=%s pages=%d queued", doc_id, len(pages))


def _queue_pages(
    task: Task,
    doc_id: str,
    request: DocumentRequest,
    ids: list[str],
    digests: list[str | None],
    queue_name: str,
    skip: set[int],
) -> None:
    """One ordinary task per drawn page: the document's task, options and priority."""
    name = request.request.task
    queue = priority_queue(queue_name, request.priority)
    message = request.request.to_message()
    message.pop("callback_url", None)  # the document's webhook fires once, for all pages
    for number, digest in enumerate(digests, start=1):
        if digest is None or number in skip:
            continue
        page_message = {
            **message,
            "images": [{"source": "staged", "ref": digest}],
            PAGE_FIELD: {"id": doc_id, "page": number},
        }
        task.app.send_task(
            name.celery_name, args=[page_message], task_id=ids[number - 1], queue=queue
        )


def _requeue_pages(
    task: Task, doc_id: str, request: DocumentRequest, runtime: WorkerRuntime
) -> None:
    record = runtime.redis.hgetall(record_key(doc_id))
    ids = json.loads(record.get(b"ids") or b"[]")
    digests = json.loads(record.get(b"digests") or b"[]")
    if len(ids) != len(digests):
        return
    ended = {n for n in range(1, len(ids) + 1) if f"page:{n}".encode() in record}
    log.info("document id=%s redelivered: queuing %d pages again", doc_id, len(ids) - len(ended))
    _queue_pages(task, doc_id, request, ids, digests, runtime.settings.queue, skip=ended)


def _empty(task_id: str, request: DocumentRequest) -> dict[str, Any]:
    return TaskResult(id=task_id, task=request.request.task.value).to_dict()


def page_stream_text(
    runtime: WorkerRuntime, page: tuple[str, int], own: StreamWriter
) -> Callable[[str], None]:
    """Where a page task's generated text goes: its own stream and its document's."""
    results = runtime.results
    doc = PageStreamWriter(
        results.results,
        page[0],
        page[1],
        own.lease,
        runtime.settings.result_expires_s,
        same_server=results.same_server,
    )
    return tee(own.write, doc.write)


def page_ended(
    runtime: WorkerRuntime, doc_id: str, page: int, task_id: str, state: str, result: dict[str, Any]
) -> None:
    """A page task stored its final state: record it; the last page joins the document.

    Never raises: it runs in the page task's `finally`."""
    try:
        key = record_key(doc_id)
        ids = json.loads(runtime.redis.hget(key, "ids") or b"[]")
        if not 1 <= page <= len(ids) or ids[page - 1] != task_id:
            log.warning("task id=%s claims page %d of document %s: ignored", task_id, page, doc_id)
            return
        text = result.get("text")
        if isinstance(text, str) and text:
            # Before the page counts as ended: the document's stream ends after every page's
            # text is in it.
            write_page_rest(
                runtime.results.results, doc_id, page, text, runtime.settings.result_expires_s
            )
        shown = {"SUCCESS": "SUCCESS", "REVOKED": "CANCELLED"}.get(state, "FAILURE")
        _record(runtime, doc_id, page, shown, result)
    except Exception:
        log.exception("document id=%s page=%d: outcome not recorded", doc_id, page)


def page_ended_again(runtime: WorkerRuntime, doc_id: str, page: int, task_id: str) -> None:
    """A page redelivered after its result was stored: report that stored result (a page
    already recorded is not counted twice). Never raises."""
    try:
        meta = decode_meta(runtime.results.results.get(result_key(task_id)))
        if meta is None or not is_final(meta):
            return
        state = str(meta["status"])
        value = meta.get("result") if state == "SUCCESS" else failure_carried(meta.get("result"))
        if isinstance(value, dict):
            page_ended(runtime, doc_id, page, task_id, state, value)
    except Exception:
        log.exception("document id=%s page=%d: stored outcome not recorded", doc_id, page)


def _record(
    runtime: WorkerRuntime, doc_id: str, page: int, state: str, result: dict[str, Any]
) -> None:
    key = record_key(doc_id)
    entry = json.dumps(page_entry(page, state, result))
    done = int(runtime.redis.eval(_PAGE_ENDED, 1, key, str(page), entry))
    if done < 0:
        return
    total = int(runtime.redis.hget(key, "total") or 0)
    if done < total:
        _report_progress(runtime, doc_id, done, total)
        return
    record = runtime.redis.hgetall(key)
    meta = json.loads(record[b"meta"])
    entries = [json.loads(record[f"page:{n}".encode()]) for n in range(1, total + 1)]
    state_, payload = join_pages(
        doc_id, meta, entries, cancelled=_cancelled(runtime.redis, doc_id), model=runtime.name
    )
    payload["worker"] = runtime.name
    payload["device"] = runtime.engine.device
    payload["model"] = runtime.engine.model_id
    stored = runtime.results.finish(
        doc_id, DOCUMENT_TASK, state_, payload, None, 0, _end_of_stream(runtime, doc_id)
    )
    if stored == STORED:
        outcome = {"SUCCESS": "success", "REVOKED": "cancelled"}.get(state_, "document_failed")
        log.info("document id=%s outcome=%s pages=%d", doc_id, outcome, total)
        notify_task_end(
            runtime.webhooks, ({"callback_url": meta.get("callback_url")},), payload, outcome
        )


def _report_progress(runtime: WorkerRuntime, doc_id: str, done: int, total: int) -> None:
    runtime.results.update(
        doc_id,
        DOCUMENT_TASK,
        PROGRESS_STATE,
        {"tokens": 0, "pages_done": done, "pages_total": total},
        None,
        0,
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
    tail = _end_of_stream(runtime, doc_id)
    stored = runtime.results.finish(doc_id, DOCUMENT_TASK, state, payload, None, 0, tail)
    log.info("document id=%s outcome=%s", doc_id, error.code.value)
    if stored == STORED:
        callback = message.get("callback_url") if isinstance(message, dict) else None
        notify_task_end(runtime.webhooks, ({"callback_url": callback},), payload, error.code.value)


def _end_of_stream(runtime: WorkerRuntime, doc_id: str) -> StreamTail:
    """The document's end entry follows every page delta its stream holds (and no page
    appends after it)."""
    seq = close_document_stream(runtime.results.results, doc_id)
    return StreamTail("", seq, seq)
