"""A document's pages as they end: their outcomes recorded once, progress, the join.

Each page task, once its own result is stored, reports to `page_ended` (worker/tasks.py):
a Lua script records its outcome once (a redelivered page counts once) and counts it; the
page that completes the count joins the pages into the document's result
(worker/document_join.py) and stores it under the document's id, so every existing reader
works unchanged. While it runs, a page's text also goes onto the document's events stream
(`page_stream_text`, worker/delivery/document_stream.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import redis
from celery.worker import state as worker_state

from vision_queue.documents import DOCUMENT_KEY, DOCUMENT_TASK, DocumentRequest
from vision_queue.protocol import CANCEL_KEY, PROGRESS_STATE
from vision_queue.results import TaskResult, decode_meta, failure_carried, is_final, result_key
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

# `runtime` below is worker.tasks.WorkerRuntime (not imported: tasks.py imports this module).
WorkerRuntime = Any
log = logging.getLogger("vision_queue.document")

# Records a page's outcome once and counts it and its tokens (ARGV[3]): returns the pages
# ended so far, the tokens they generated and the page count; or -1 first when this page
# had already been recorded (a redelivered page, or a second report), -2 when the record
# is gone.
_PAGE_ENDED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2, 0, 0} end
if redis.call('HSETNX', KEYS[1], 'page:' .. ARGV[1], ARGV[2]) == 0 then return {-1, 0, 0} end
local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
local tokens = redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[3])
return {done, tokens, tonumber(redis.call('HGET', KEYS[1], 'total') or 0)}
"""


def record_key(doc_id: str) -> str:
    return DOCUMENT_KEY.format(doc_id=doc_id)


def cancelled(client: redis.Redis, doc_id: str) -> bool:
    if doc_id in worker_state.revoked:
        return True
    with contextlib.suppress(redis.RedisError):
        return bool(client.exists(CANCEL_KEY.format(task_id=doc_id)))
    return False


def empty_page(task_id: str, request: DocumentRequest) -> dict[str, Any]:
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
        record_page(runtime, doc_id, page, shown, result)
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


def record_page(
    runtime: WorkerRuntime, doc_id: str, page: int, state: str, result: dict[str, Any]
) -> None:
    key = record_key(doc_id)
    entry = page_entry(page, state, result)
    generated = entry["usage"]["completion_tokens"]
    done, tokens, total = (
        int(n)
        for n in runtime.redis.eval(_PAGE_ENDED, 1, key, str(page), json.dumps(entry), generated)
    )
    if done < 0:
        return
    if done < total:
        report_progress(runtime, doc_id, done, total, tokens)
        return
    record = runtime.redis.hgetall(key)
    meta = json.loads(record[b"meta"])
    entries = [json.loads(record[f"page:{n}".encode()]) for n in range(1, total + 1)]
    state_, payload = join_pages(
        doc_id, meta, entries, cancelled=cancelled(runtime.redis, doc_id), model=runtime.name
    )
    payload["worker"] = runtime.name
    payload["device"] = runtime.engine.device
    payload["model"] = runtime.engine.model_id
    stored = runtime.results.finish(
        doc_id, DOCUMENT_TASK, state_, payload, None, 0, end_of_stream(runtime, doc_id)
    )
    if stored == STORED:
        outcome = {"SUCCESS": "success", "REVOKED": "cancelled"}.get(state_, "document_failed")
        log.info("document id=%s outcome=%s pages=%d", doc_id, outcome, total)
        notify_task_end(
            runtime.webhooks, ({"callback_url": meta.get("callback_url")},), payload, outcome
        )


def report_progress(
    runtime: WorkerRuntime, doc_id: str, done: int, total: int, tokens: int = 0
) -> None:
    """The document's PROGRESS state: pages ended so far, and the tokens they generated."""
    runtime.results.update(
        doc_id,
        DOCUMENT_TASK,
        PROGRESS_STATE,
        {"tokens": tokens, "pages_done": done, "pages_total": total},
        None,
        0,
    )


def end_of_stream(runtime: WorkerRuntime, doc_id: str) -> StreamTail:
    """The document's end entry follows every page delta its stream holds (and no page
    appends after it)."""
    seq = close_document_stream(runtime.results.results, doc_id)
    return StreamTail("", seq, seq)
