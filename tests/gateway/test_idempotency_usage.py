"""Idempotency keys (gateway header and both Python clients) and usage per API key.

Real parts: `producer serve`, redis-server, a worker on the tiny checkpoint; racing
requests are real concurrent HTTP requests released together by a barrier.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from gateway_support import (
    API_KEY,
    MODEL,
    OTHER_KEY,
    GatewayProcess,
    submitted_count,
    wait_for_result,
)
from support.redis_server import RedisServer

from producer import AsyncClient, Client
from producer.idempotency import IdempotencyConflict
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(300)

KEY_NAME = hashlib.sha256(API_KEY.encode()).hexdigest()[:12]


def ask(prompt: str, tokens: int = 4) -> dict[str, Any]:
    return {"task": "ask", "prompt": prompt, "options": {"max_new_tokens": tokens}}


def together(count: int, call: Callable[[], Any]) -> list[Any]:
    """`call` from `count` threads released at the same moment."""
    barrier = threading.Barrier(count)
    answers: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        answers[index] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_a_repeated_task_request_returns_the_first_task(
    api: httpx.Client, gateway: GatewayProcess, module_redis: RedisServer
):
    before = submitted_count(module_redis.url)
    headers = {"Idempotency-Key": "order-1001"}
    first = api.post("/v1/tasks", json=ask("Hello."), headers=headers)
    again = api.post("/v1/tasks", json=ask("Hello."), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert submitted_count(module_redis.url) == before + 1
    changed = api.post("/v1/tasks", json=ask("Goodbye."), headers=headers)
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    # Keys are the API key's own: another key's same Idempotency-Key is another task.
    theirs = httpx.post(
        gateway.url("/v1/tasks"),
        json=ask("Hello."),
        headers={**headers, "Authorization": f"Bearer {OTHER_KEY}"},
    )
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_a_refused_request_leaves_its_key_free_for_the_retry(api: httpx.Client):
    headers = {"Idempotency-Key": "fix-and-retry"}
    # Refused by the client's checks, inside the claimed key: the claim is dropped.
    refused = api.post("/v1/tasks", json=ask("<|end|> control tokens"), headers=headers)
    assert refused.status_code == 400
    retried = api.post("/v1/tasks", json=ask("Now with a prompt."), headers=headers)
    assert retried.status_code == 202
    too_long = api.post("/v1/tasks", json=ask("Hi."), headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "Idempotency-Key"


def test_two_identical_requests_at_once_create_one_task(
    api: httpx.Client, module_redis: RedisServer
):
    before = submitted_count(module_redis.url)
    headers = {"Idempotency-Key": "race-tasks"}
    answers = together(6, lambda: api.post("/v1/tasks", json=ask("Race."), headers=headers))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert submitted_count(module_redis.url) == before + 1
    wait_for_result(api, answers[0].json()["id"])


def test_racing_chat_completions_with_one_key_get_one_completion(
    sdk: openai.OpenAI, module_redis: RedisServer
):
    before = submitted_count(module_redis.url)

    def complete() -> Any:
        return sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Race me."}],
            max_tokens=4,
            extra_headers={"Idempotency-Key": "race-chat"},
        )

    answers = together(4, complete)
    assert len({a.id for a in answers}) == 1
    assert len({a.choices[0].message.content for a in answers}) == 1
    assert submitted_count(module_redis.url) == before + 1


def test_a_repeated_batch_request_returns_the_first_batch(sdk: openai.OpenAI):
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    }
    data = io.BytesIO((json.dumps(line) + "\n").encode())
    file_id = sdk.files.create(file=("in.jsonl", data), purpose="batch").id
    headers = {"Idempotency-Key": "nightly-2026-12-06"}
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    first = sdk.batches.create(**create, completion_window="24h", extra_headers=headers)
    again = sdk.batches.create(**create, completion_window="24h", extra_headers=headers)
    assert first.id == again.id
    with pytest.raises(openai.ConflictError) as conflict:
        sdk.batches.create(
            **create, completion_window="24h", metadata={"x": "y"}, extra_headers=headers
        )
    assert conflict.value.body["code"] == "idempotency_conflict"
    # Its line ends before the next test counts what was queued.
    deadline = time.monotonic() + 120
    while sdk.batches.retrieve(first.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.fixture
def settings(module_redis: RedisServer) -> Settings:
    return Settings.from_env({}, redis_url=module_redis.url, connect_timeout_s=3.0)


def test_the_python_client_submits_once_per_idempotency_key(
    settings: Settings, module_redis: RedisServer
):
    before = submitted_count(module_redis.url)
    with Client(settings) as client:
        first = client.submit("ask", [], "Once.", max_new_tokens=2, idempotency_key="c-1")
        again = client.submit("ask", [], "Once.", max_new_tokens=2, idempotency_key="c-1")
        assert first.id == again.id
        with pytest.raises(IdempotencyConflict):
            client.submit("ask", [], "Twice?", max_new_tokens=2, idempotency_key="c-1")
        answers = together(
            4,
            lambda: client.submit("ask", [], "Race.", max_new_tokens=2, idempotency_key="c-2"),
        )
    assert len({handle.id for handle in answers}) == 1
    assert submitted_count(module_redis.url) == before + 2


def test_the_async_client_submits_once_per_idempotency_key(
    settings: Settings, module_redis: RedisServer
):
    async def main() -> list[str]:
        async with AsyncClient(settings) as client:
            handles = await asyncio.gather(
                *(
                    client.submit("ask", [], "Async.", max_new_tokens=2, idempotency_key="a-1")
                    for _ in range(4)
                )
            )
            with pytest.raises(IdempotencyConflict):
                await client.submit("ask", [], "Other.", idempotency_key="a-1")
            return [handle.id for handle in handles]

    before = submitted_count(module_redis.url)
    assert len(set(asyncio.run(main()))) == 1
    assert submitted_count(module_redis.url) == before + 1


def test_usage_counts_each_finished_task_once_for_its_key(
    sdk: openai.OpenAI, api: httpx.Client, gateway: GatewayProcess
):
    before = api.get("/v1/usage").json()
    completion = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count me."}], max_tokens=4
    )
    task = api.post("/v1/tasks", json=ask("Count me too.", 3)).json()["id"]
    result = wait_for_result(api, task)
    wait_for_result(api, task)  # read again: not counted again
    after = api.get("/v1/usage").json()
    assert after["object"] == "usage" and after["key"] == KEY_NAME
    assert after["tasks"] - before["tasks"] == 2
    assert after["prompt_tokens"] - before["prompt_tokens"] == (
        completion.usage.prompt_tokens + result["usage"]["prompt_tokens"]
    )
    assert after["completion_tokens"] - before["completion_tokens"] == (
        completion.usage.completion_tokens + result["usage"]["completion_tokens"]
    )
    assert after["data"][-1]["tasks"] >= 2
    # The other key's usage is its own.
    theirs = httpx.get(
        gateway.url("/v1/usage"), headers={"Authorization": f"Bearer {OTHER_KEY}"}
    ).json()
    assert theirs["key"] != KEY_NAME
    metrics = httpx.get(gateway.url("/metrics")).text
    assert f'vq_gateway_usage_tasks_total{{key="{KEY_NAME}"}}' in metrics
    assert "vq_gateway_usage_completion_tokens_total" in metrics
    assert API_KEY not in metrics
