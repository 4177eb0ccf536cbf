"""A task with several choices streams them side by side (real redis-server): every delta
names its choice, the sequence stays one (no gaps, one end entry), each choice's deltas
join to its text and carry its own tokens' logprobs; a rerun repeats nothing; a reader's
`StreamFollower` exposes `choice`, and a single-choice task's deltas have none."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from support.redis_server import RedisServer

from vision_queue.logprobs import TokenLogprob, alternative, entry
from vision_queue.settings import Settings
from vision_queue.streams import StreamEvent, StreamFollower, stream_key
from worker.delivery import streams
from worker.delivery.results import STORED, ResultStore
from worker.delivery.streams import StreamWriter

CHOICES = {0: ["The", " cat"], 1: ["A", " dog", " ran"], 2: ["One"]}


def token(text: str) -> TokenLogprob:
    data = text.encode()
    return entry(text, data, -0.5, [alternative(text, data, -0.5)])


def read(client: redis.Redis, task_id: str) -> list[StreamEvent]:
    entries: Any = client.xrange(stream_key(task_id), "-", "+")
    return StreamFollower(task_id).accept(entries)


def generate(writer: StreamWriter, pieces: dict[int, list[str]]) -> None:
    """The choices' tokens interleaved, as their threads deliver them."""
    longest = max(len(texts) for texts in pieces.values())
    for step in range(longest):
        for choice, texts in pieces.items():
            if step < len(texts):
                writer.write_logprobs(token(texts[step]), choice)
                writer.write(texts[step], choice)


def finish(client: redis.Redis, task_id: str, writer: StreamWriter) -> str:
    store = ResultStore(client, client, Settings.from_env({}), "w1", same_server=True)
    result = {"id": task_id, "text": "".join(CHOICES[0])}
    return store.finish(task_id, "vq.ask", "SUCCESS", result, None, 0, writer.tail())


def test_choices_stream_side_by_side_in_one_gapless_sequence(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_server.client()
    task_id = str(uuid.uuid4())
    # Given a writer that flushes at most once per interval (here: only the first piece)
    monkeypatch.setattr(streams, "FLUSH_INTERVAL_S", 3600.0)
    writer = StreamWriter(client, task_id, None, 60)
    writer.begin()
    # When three choices generate side by side and the task ends
    generate(writer, CHOICES)
    assert finish(client, task_id, writer) == STORED
    # Then the stream is one sequence with one end entry, every delta naming its choice
    events = read(client, task_id)
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.kind for e in events].count("end") == 1 and events[-1].kind == "end"
    deltas = events[:-1]
    assert all(e.choice is not None for e in deltas)
    # And each choice's deltas join to its text, with its own tokens' logprobs
    for choice, texts in CHOICES.items():
        mine = [e for e in deltas if e.choice == choice]
        assert "".join(e.text for e in mine) == "".join(texts)
        streamed = [x["token"] for e in mine for x in e.logprobs or []]
        assert streamed == texts[: len(streamed)]  # the rest is in the result


def test_a_rerun_of_a_task_with_choices_repeats_no_choices_text(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_server.client()
    task_id = str(uuid.uuid4())
    monkeypatch.setattr(streams, "FLUSH_INTERVAL_S", 0.0)  # every piece flushed at once
    # Given a run that streamed the choices' first tokens, then died
    first = StreamWriter(client, task_id, None, 60)
    first.begin()
    generate(first, {0: CHOICES[0][:1], 1: CHOICES[1][:2]})
    # When another run generates the same choices from the start, and ends
    rerun = StreamWriter(client, task_id, None, 60)
    rerun.begin()
    generate(rerun, CHOICES)
    assert finish(client, task_id, rerun) == STORED
    # Then every choice's text is in the stream exactly once, the sequence without gaps
    events = read(client, task_id)
    assert [e.seq for e in events] == list(range(len(events)))
    for choice, texts in CHOICES.items():
        assert "".join(e.text for e in events if e.choice == choice) == "".join(texts)
        tokens = [x["token"] for e in events if e.choice == choice for x in e.logprobs or []]
        assert tokens == texts


def test_the_follower_reads_choice_and_leaves_it_none_for_single_choice_tasks() -> None:
    # Given entries as a worker writes them: a single-choice delta and two choices' deltas
    entries: list[tuple[Any, dict[Any, Any]]] = [
        (b"1-0", {b"seq": b"0", b"kind": b"delta", b"text": b"Hi"}),
        (b"1-1", {b"seq": b"1", b"kind": b"delta", b"text": b"A", b"choice": b"0"}),
        (b"1-2", {b"seq": b"2", b"kind": b"delta", b"text": b"B", b"choice": b"2"}),
        (b"1-3", {b"seq": b"3", b"kind": b"end", b"result": json.dumps({"state": "SUCCESS"})}),
    ]
    # When a follower reads them
    events = StreamFollower("t").accept(entries)
    # Then the choice is what the entry names, and absent stays None
    assert [(e.kind, e.choice) for e in events] == [
        ("delta", None),
        ("delta", 0),
        ("delta", 2),
        ("end", None),
    ]
