"""A document's stream on a real Redis: pages appending side by side, a redelivered page,
the rest of a page written at its end, and nothing after the document's end."""

from __future__ import annotations

import redis

from vision_queue.streams import StreamFollower, stream_key
from worker.delivery.document_stream import (
    PageStreamWriter,
    append,
    close_document_stream,
    write_page_rest,
)


def events(client: redis.Redis, doc_id: str):
    return StreamFollower(doc_id).accept(client.xrange(stream_key(doc_id)))


def test_pages_appending_side_by_side_share_one_gapless_sequence(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert append(client, "d1", 1, 0, "Hello ", 60) == 6
    assert append(client, "d1", 2, 0, "Bonjour", 60) == 7
    assert append(client, "d1", 1, 6, "world", 60) == 11
    got = events(client, "d1")
    assert [(e.seq, e.page, e.text) for e in got] == [
        (0, 1, "Hello "),
        (1, 2, "Bonjour"),
        (2, 1, "world"),
    ]


def test_a_redelivered_page_repeats_nothing_and_continues_where_the_stream_stands(redis_url):
    client = redis.Redis.from_url(redis_url)
    first = PageStreamWriter(client, "d2", 1, None, 60)
    first.write("The quick ")  # flushed at once: the first piece always is
    # The worker dies; the page runs again and generates the same text from the start.
    again = PageStreamWriter(client, "d2", 1, None, 60)
    again.write("The ")  # behind what is streamed: the script refuses, the writer learns where
    write_page_rest(client, "d2", 1, "The quick brown fox", 60)
    assert "".join(e.text for e in events(client, "d2")) == "The quick brown fox"


def test_nothing_is_appended_after_the_document_ended(redis_url):
    client = redis.Redis.from_url(redis_url)
    append(client, "d3", 1, 0, "one", 60)
    append(client, "d3", 2, 0, "two", 60)
    assert close_document_stream(client, "d3") == 2  # the end entry's seq follows the deltas
    assert append(client, "d3", 1, 3, " more", 60) == -2
    assert len(events(client, "d3")) == 2
