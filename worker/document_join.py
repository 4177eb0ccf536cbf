"""A document's result from its pages' results: pages in order, joined text, summed usage.

The document succeeds when at most `max_failed_pages` pages failed; otherwise it fails
with `document_failed`, still listing every page. A document cancelled by its client ends
cancelled (REVOKED), keeping the pages already done.
"""

from __future__ import annotations

import time
from typing import Any

from vision_queue.documents import PAGE_SEPARATOR
from vision_queue.errors import Cancelled, DocumentFailed

_TIMING_FIELDS = ("queued", "fetch", "preprocess", "generate", "total")


def page_entry(page: int, state: str, result: dict[str, Any]) -> dict[str, Any]:
    """One page as the document's `pages` list shows it."""
    usage = result.get("usage") or {}
    entry: dict[str, Any] = {
        "page": page,
        "id": result.get("id", ""),
        "state": state,
        "text": result.get("text", ""),
        "usage": {
            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "completion_tokens": int(usage.get("completion_tokens", 0)),
        },
        "finish_reason": result.get("finish_reason", ""),
        "worker": result.get("worker", ""),
    }
    if state != "SUCCESS" and result.get("error"):
        entry["error"] = result["error"]
    return entry


def join_text(entries: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for entry in entries:
        if parts:
            parts.append(PAGE_SEPARATOR.format(page=entry["page"]))
        parts.append(str(entry.get("text", "")))
    return "".join(parts)


def join_pages(
    doc_id: str,
    meta: dict[str, Any],
    entries: list[dict[str, Any]],
    *,
    cancelled: bool,
    model: str = "",
) -> tuple[str, dict[str, Any]]:
    """(final state, result payload) of a document whose pages have all ended."""
    entries = sorted(entries, key=lambda entry: int(entry["page"]))
    failed = [entry for entry in entries if entry["state"] == "FAILURE"]
    stopped = [entry for entry in entries if entry["state"] == "CANCELLED"]
    now = time.time()
    submitted = float(meta.get("submitted_at") or now)
    started = float(meta.get("started_at") or submitted)
    payload: dict[str, Any] = {
        "id": doc_id,
        "task": str(meta.get("task", "")),
        "text": join_text(entries),
        "model": model,
        "usage": {
            "prompt_tokens": sum(e["usage"]["prompt_tokens"] for e in entries),
            "completion_tokens": sum(e["usage"]["completion_tokens"] for e in entries),
        },
        "finish_reason": "stop",
        "timings": {
            "queued": round(max(0.0, started - submitted), 4),
            "fetch": 0.0,
            "preprocess": 0.0,
            "generate": 0.0,
            "total": round(max(0.0, now - submitted), 4),
        },
        "pages": entries,
        "pages_total": len(entries),
        "pages_done": len(entries),
        "pages_failed": len(failed),
    }
    if cancelled or stopped:
        payload["finish_reason"] = "cancelled"
        payload["error"] = Cancelled(
            f"cancelled by the client; {len(entries) - len(failed) - len(stopped)} of "
            f"{len(entries)} pages were done"
        ).to_dict()
        return "REVOKED", payload
    allowed = int(meta.get("max_failed_pages") or 0)
    if len(failed) > allowed:
        numbers = ", ".join(str(entry["page"]) for entry in failed[:20])
        payload["finish_reason"] = ""
        payload["error"] = DocumentFailed(
            f"{len(failed)} of {len(entries)} pages failed (pages {numbers}); "
            f"max_failed_pages is {allowed}"
        ).to_dict()
        return "FAILURE", payload
    return "SUCCESS", payload
