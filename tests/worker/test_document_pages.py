"""A document's record as its pages end (real redis-server): progress counts each ended
page once, with the tokens its pages generated, and the status clients read shows both."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

from support.redis_server import RedisServer

from producer import Client
from vision_queue.settings import Settings
from worker.delivery.results import ResultStore
from worker.document_pages import record_key, record_page


def page_result(page: int, generated: int) -> dict[str, Any]:
    return {
        "id": f"page-{page}",
        "text": f"text of page {page}",
        "usage": {"prompt_tokens": 100, "completion_tokens": generated},
    }


def test_a_running_documents_status_counts_its_ended_pages_and_their_tokens(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    settings = Settings.from_env({}, redis_url=redis_server.url)
    runtime: Any = SimpleNamespace(
        redis=client,
        results=ResultStore(client, client, settings, "w1", same_server=True),
        name="w1",
    )
    # Given a document of three pages, none ended
    doc_id = str(uuid.uuid4())
    ids = [f"page-{n}" for n in (1, 2, 3)]
    client.hset(
        record_key(doc_id),
        mapping={"ids": json.dumps(ids), "total": 3, "done": 0, "meta": json.dumps({})},
    )
    # When page 2 ends with 7 tokens, then page 1 with 4, and page 2's end is told again
    record_page(runtime, doc_id, 2, "SUCCESS", page_result(2, 7))
    record_page(runtime, doc_id, 1, "SUCCESS", page_result(1, 4))
    record_page(runtime, doc_id, 2, "SUCCESS", page_result(2, 7))
    # Then its status shows two pages of three done, and their 11 tokens (counted once)
    with Client(settings) as reader:
        status = reader.status(doc_id)
    assert status.shown_state == "STARTED"
    assert (status.pages_done, status.pages_total, status.tokens) == (2, 3, 11)
