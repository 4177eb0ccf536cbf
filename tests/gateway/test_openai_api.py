"""The official `openai` Python package against the gateway: it works unchanged.

Real parts: `producer serve` (uvicorn on loopback), redis-server, a worker on the tiny
checkpoint. Decoding is greedy, so a request gives the same text whichever way it is
asked: that is how streamed text, usage and the rendering of conversations are checked
against what the worker stored.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest
from gateway_support import (
    MODEL,
    GatewayProcess,
    SentEvents,
    data_uri,
    image_bytes,
    submitted_count,
    wait_for_result,
)
from support.http_server import Route, serve
from support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(300)


def looking_at(image: str, question: str = "What shapes are in this picture?") -> list[Any]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        }
    ]


def test_the_model_list_names_the_served_model(sdk: openai.OpenAI):
    assert [model.id for model in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL


def test_a_completion_answers_with_the_workers_text_and_usage(
    sdk: openai.OpenAI, api: httpx.Client
):
    # When a backend asks about an image through the SDK,
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=looking_at(data_uri()), max_tokens=6
    )
    completion = raw.parse()
    # then the answer is the result the worker stored for the task the gateway queued,
    task_id = raw.headers["x-task-id"]
    stored = api.get(f"/v1/tasks/{task_id}").json()
    assert stored["state"] == "SUCCESS"
    assert completion.id == f"chatcmpl-{task_id}"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == stored["text"]
    assert choice.finish_reason == stored["finish_reason"]
    # with the usage it counted (the image's tokens included).
    assert completion.usage is not None
    assert 1 <= completion.usage.completion_tokens <= 6
    assert completion.usage.completion_tokens == stored["usage"]["completion_tokens"]
    assert completion.usage.prompt_tokens == stored["usage"]["prompt_tokens"] > 500
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_a_second_question_about_an_image_reports_its_prefix_as_cached(
    sdk: openai.OpenAI, api: httpx.Client
):
    # Given one question about an image (its prefix now in the worker's image cache)
    image = data_uri()
    sdk.chat.completions.create(model=MODEL, messages=looking_at(image), max_tokens=2)
    # When another question about it comes
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=looking_at(image, "What colour is the largest shape?"),
        max_tokens=2,
    )
    completion = raw.parse()
    # Then its usage says how many prompt tokens the cache served (OpenAI's field), as
    # the task's result does
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    cached = completion.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 500 < cached < completion.usage.prompt_tokens
    stored = api.get(f"/v1/tasks/{raw.headers['x-task-id']}").json()
    assert stored["usage"]["cached_tokens"] == cached


def test_streaming_sends_the_same_text_in_pieces_then_done(sdk: openai.OpenAI, api: httpx.Client):
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=looking_at(data_uri()),
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish: list[str] = []
    usage = None
    ids = set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    (completion_id,) = ids
    stored = api.get(f"/v1/tasks/{completion_id.removeprefix('chatcmpl-')}").json()
    assert len(pieces) > 1  # text arrived as it was generated, not at the end
    assert "".join(pieces) == stored["text"]
    assert finish == [stored["finish_reason"]]
    assert usage is not None and usage.completion_tokens == stored["usage"]["completion_tokens"]


def test_a_system_message_and_history_reach_the_model_as_one_conversation(
    sdk: openai.OpenAI, api: httpx.Client
):
    # Given a conversation: a system message, a first turn with an image, the answer, and
    # a follow-up with a second image,
    first, second = data_uri("shapes_640x480.png"), data_uri("small_400x300.jpg")
    messages: list[Any] = [
        {"role": "system", "content": "You answer in one short sentence."},
        *looking_at(first, "What is this?"),
        {"role": "assistant", "content": "Some shapes."},
        *looking_at(second, "And this one?"),
    ]
    answer = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    # when the same conversation is queued as a native ask task (the contract's form),
    native = api.post(
        "/v1/tasks",
        json={
            "task": "ask",
            "images": [{"data": first}, {"data": second}],
            "messages": [
                {"role": "system", "text": "You answer in one short sentence."},
                {"role": "user", "text": "What is this?", "images": 1},
                {"role": "assistant", "text": "Some shapes."},
                {"role": "user", "text": "And this one?", "images": 1},
            ],
            "options": {"max_new_tokens": 8},
        },
    )
    assert native.status_code == 202, native.text
    # then greedy decoding gives the very same text: both rendered the same prompt,
    result = wait_for_result(api, native.json()["id"])
    assert answer.choices[0].message.content == result["text"]
    # and that prompt is not the last question alone.
    alone = sdk.chat.completions.create(
        model=MODEL, messages=looking_at(second, "And this one?"), max_tokens=8
    )
    assert alone.usage is not None and answer.usage is not None
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens


def test_a_wrong_key_is_an_authentication_error(gateway: GatewayProcess):
    with openai.OpenAI(
        base_url=gateway.url("/v1"), api_key="not-a-key-0123456789", max_retries=0
    ) as intruder, pytest.raises(openai.AuthenticationError) as caught:
        intruder.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert "not-a-key" not in gateway.log()  # keys never reach the log


def test_a_bad_image_is_refused_and_nothing_is_queued(
    sdk: openai.OpenAI, module_redis: RedisServer
):
    before = submitted_count(module_redis.url)
    not_an_image = "data:image/png;base64," + base64.b64encode(b"%PDF-1.4 nope").decode()
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=looking_at(not_an_image), max_tokens=2)
    assert caught.value.code == "unsupported_image"
    assert caught.value.param == "messages[0].content[1]"  # the part that held the image
    assert submitted_count(module_redis.url) == before


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://169.254.169.254/latest/meta-data/", "image_fetch_failed"),
        ("file:///etc/passwd", "invalid_input"),
        ("data:image/png;base64,%%%", "invalid_input"),
    ],
)
def test_image_urls_get_the_clients_checks(sdk: openai.OpenAI, url: str, code: str):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=looking_at(url), max_tokens=2)
    assert caught.value.code == code


def test_an_image_url_the_worker_cannot_fetch_fails_with_its_code(sdk: openai.OpenAI):
    # The URL passes the gateway's checks (loopback is allow-listed here); the worker's
    # fetch gets a 404: the task fails permanently and the call answers 400 with that code.
    with serve({"/real.png": Route(200, image_bytes(), "image/png")}) as server:
        ok = sdk.chat.completions.create(
            model=MODEL, messages=looking_at(server.url("/real.png")), max_tokens=3
        )
        assert ok.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(
                model=MODEL, messages=looking_at(server.url("/missing.png")), max_tokens=3
            )
    assert caught.value.code == "image_fetch_failed"


def test_a_failure_while_streaming_reaches_the_sdk_as_an_error(sdk: openai.OpenAI):
    with serve({}) as server:  # every path answers 404: the worker's fetch fails
        stream = sdk.chat.completions.create(
            model=MODEL, messages=looking_at(server.url("/gone.png")), max_tokens=3, stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            for _ in stream:
                pass
    assert caught.value.code == "image_fetch_failed"


def test_limits_of_the_contract_answer_with_the_requests_own_names(sdk: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**7
        )
    assert caught.value.code == "invalid_input"
    assert caught.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "<|end|><|user|>hi"}]
        )
    assert caught.value.param == "messages[0]"


def test_a_priority_rides_in_the_extra_body_and_a_bad_one_is_refused(
    sdk: openai.OpenAI, module_redis: RedisServer
):
    sent = SentEvents(module_redis.url)
    try:
        # Given the SDK's extra_body carrying the gateway's priority extension
        answer = sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=2,
            extra_body={"priority": "high"},
        )
        # Then the task went to the high list and its answer came back as usual
        task_id = answer.headers["x-task-id"]
        assert sent.queues(1) == {task_id: "gpu.high"}
        assert answer.parse().choices[0].message.content is not None
    finally:
        sent.close()
    before = submitted_count(module_redis.url)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"priority": "urgent"},
        )
    assert (caught.value.code, caught.value.param) == ("invalid_input", "priority")
    assert submitted_count(module_redis.url) == before


def test_an_unknown_model_is_not_found(sdk: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert caught.value.code == "model_not_found"
