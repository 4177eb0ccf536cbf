"""A task's stream carries its tokens' logprobs with the text deltas (real redis-server):
each delta the entries of the tokens generated since the one before, read back by the
clients' `StreamFollower`; a rerun skips the entries an earlier run already wrote."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from support.redis_server import RedisServer

from vision_queue.logprobs import TokenLogprob, alternative, entry
from vision_queue.streams import StreamEvent, StreamFollower, stream_key
from worker.delivery import streams
from worker.delivery.streams import StreamWriter


def token(text: str) -> TokenLogprob:
    data = text.encode()
    return entry(text, data, -0.5, [alternative(text, data, -0.5)])


def read(client: redis.Redis, task_id: str) -> list[StreamEvent]:
    follower = StreamFollower(task_id)
    entries: Any = client.xrange(stream_key(task_id), "-", "+")
    return follower.accept(entries)


def test_deltas_carry_the_logprobs_of_their_tokens(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "FLUSH_INTERVAL_S", 0.0)  # every piece its own delta
    client = redis_server.client()
    task_id = str(uuid.uuid4())
    # Given a writer that gets each token's logprobs ahead of its text
    writer = StreamWriter(client, task_id, None, 60)
    writer.begin()
    for text in ("The", " cat", " sat"):
        writer.write_logprobs(token(text))
        writer.write(text)
    # Then each delta has its text and its token's entry, as a reader sees them
    events = read(client, task_id)
    assert [e.text for e in events] == ["The", " cat", " sat"]
    assert [[x["token"] for x in e.logprobs or []] for e in events] == [["The"], [" cat"], [" sat"]]
    # And a rerun of the task (same tokens) writes no entry twice
    rerun = StreamWriter(client, task_id, None, 60)
    rerun.begin()
    for text in ("The", " cat", " sat", " down"):
        rerun.write_logprobs(token(text))
        rerun.write(text)
    events = read(client, task_id)
    tokens = [x["token"] for e in events for x in e.logprobs or []]
    assert tokens == ["The", " cat", " sat", " down"]
    assert "".join(e.text for e in events) == "The cat sat down"
