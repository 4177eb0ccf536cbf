"""Streamed text from a real worker: deltas in order, joined they are the result's text.

The tiny checkpoint's random weights emit text in many scripts (Cyrillic, CJK, accents),
so multi-byte characters are in every stream; a delta never holds part of a character
because it is a Python str decoded from whole characters by the worker.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from support.workers import base_env, run_cli

from producer import AsyncClient, Client, TaskFailed
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(300)

PROMPT = "Raconte une histoire: 猫と犬, Ünïcödé ✓"


def test_the_deltas_joined_are_the_final_text(client: Client) -> None:
    handle = client.submit("ask", [], PROMPT, max_new_tokens=64)
    deltas = list(client.stream(handle.id))
    result = client.result(handle.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS"
    assert len(deltas) >= 1 and all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == result["text"]
    assert any(ord(ch) > 127 for ch in result["text"])  # multi-byte text did stream


def test_a_late_reader_gets_everything_and_a_resumed_one_the_rest(client: Client) -> None:
    handle = client.submit("ask", [], PROMPT, max_new_tokens=64)
    result = client.result(handle.id, wait=True, timeout=120)
    assert result is not None
    # Late: the task is over before reading starts.
    events = list(client.stream_events(handle.id))
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].kind == "end" and events[-1].result == result
    assert "".join(e.text for e in events) == result["text"]
    # Resumed from every cursor: exactly the events after it, no gap and no repeat.
    for index, event in enumerate(events[:-1]):
        rest = list(client.stream_events(handle.id, after=event.cursor))
        assert rest == events[index + 1 :]


def test_a_failed_task_streams_then_raises_with_its_code(client: Client) -> None:
    handle = client.submit("ask", [], "__OOM__ please", max_new_tokens=8)
    with pytest.raises(TaskFailed) as failure:
        list(client.stream(handle.id))
    assert failure.value.result["error"]["code"] == "resource_exhausted"
    assert failure.value.result["state"] == "FAILURE"


def test_the_async_client_streams_the_same(client_settings: Settings, shared_worker) -> None:
    async def scenario() -> tuple[list[str], dict]:
        async with AsyncClient(client_settings) as client:
            handle = await client.submit("ask", [], PROMPT, max_new_tokens=48)
            deltas = [text async for text in client.stream(handle.id)]
            result = await client.result(handle.id, wait=True, timeout=120)
            assert result is not None
            return deltas, result

    deltas, result = asyncio.run(scenario())
    assert result["state"] == "SUCCESS"
    assert "".join(deltas) == result["text"]


def test_the_cli_prints_the_text_as_it_streams(module_redis, shared_worker, images: Path) -> None:
    env = base_env(module_redis.url)
    done = run_cli(
        "producer",
        ["submit", "--task", "describe", "--image", str(images / "small_400x300.jpg"), "--stream"],
        env,
    )
    assert done.returncode == 0, done.stderr
    events = run_cli(
        "producer",
        ["submit", "--task", "ask", "--prompt", PROMPT, "--stream", "--json"],
        env,
    )
    assert events.returncode == 0, events.stderr
    lines = [json.loads(line) for line in events.stdout.splitlines()]
    end = lines[-1]
    assert end["kind"] == "end" and end["result"]["state"] == "SUCCESS"
    assert "".join(line.get("text", "") for line in lines) == end["result"]["text"]
    again = run_cli("producer", ["result", end["result"]["id"], "--stream"], env)
    assert again.returncode == 0
    assert again.stdout == end["result"]["text"] + "\n"
    assert done.stdout.strip()  # the describe text, printed as it came


def test_a_task_with_choices_streams_each_and_stream_keeps_to_the_first(
    client: Client, client_settings: Settings
) -> None:
    # Given a task with three sampled choices
    handle = client.submit(
        "ask", [], PROMPT, max_new_tokens=16, temperature=1.0, seed=9, n=3
    )
    # When its events are read, and its text stream
    events = list(client.stream_events(handle.id))
    texts = list(client.stream(handle.id))
    result = events[-1].result
    assert result is not None and result["state"] == "SUCCESS"
    # Then one gapless sequence holds every choice's deltas, each joining to its text
    assert [e.seq for e in events] == list(range(len(events)))
    for choice in result["choices"]:
        mine = [e.text for e in events if e.kind == "delta" and e.choice == choice["index"]]
        assert "".join(mine) == choice["text"]
    assert {e.choice for e in events if e.kind == "delta"} == {0, 1, 2}
    # And `stream` yields the first choice's text: the result's `text`, on both clients
    assert "".join(texts) == result["text"] == result["choices"][0]["text"]

    async def read() -> list[str]:
        async with AsyncClient(client_settings) as reader:
            return [text async for text in reader.stream(handle.id)]

    assert "".join(asyncio.run(read())) == result["text"]
