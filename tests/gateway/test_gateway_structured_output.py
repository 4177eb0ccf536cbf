"""Structured output through the gateway: the official `openai` SDK's `parse()` with a
pydantic model (chat completions and the Responses API), `response_format` streamed, the
native task API's `options.response_format`, and a schema outside the subset refused with
a 400 naming it.

Real parts: `producer serve`, redis-server, a worker on the tiny random-weight checkpoint.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from gateway_support import MODEL, data_uri, wait_for_result
from pydantic import BaseModel, Field
from support.schemas import BOOK, SCHEMAS, UNSUPPORTED, response_format

pytestmark = pytest.mark.timeout(300)


class BookCover(BaseModel):
    title: str = Field(max_length=30)
    author: str = Field(max_length=30)


def cover_question(text: str = "The book's title and author?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_uri()}},
            ],
        }
    ]


def test_the_sdks_parse_returns_the_pydantic_model(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.parse(
        model=MODEL, messages=cover_question(), response_format=BookCover, max_tokens=120
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, BookCover)
    assert len(choice.message.parsed.title) <= 30


def test_a_streamed_json_schema_completion_validates(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=cover_question(),
        response_format=response_format("book", BOOK),
        max_tokens=120,
        stream=True,
    )
    pieces, finish = [], []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert finish == ["stop"]
    jsonschema.validate(json.loads("".join(pieces)), BOOK)


def test_a_budget_that_ends_the_json_early_is_length(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=cover_question(),
        response_format=response_format("nested", SCHEMAS["nested_objects"]),
        max_tokens=3,
    )
    assert completion.choices[0].finish_reason == "length"
    assert (completion.choices[0].message.content or "").startswith("{")


def test_json_object_mode_gives_an_object(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL, messages=cover_question(), response_format={"type": "json_object"},
        max_tokens=6,
    )
    assert (completion.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_an_unsupported_schema_is_a_400_naming_response_format(
    sdk: openai.OpenAI, name: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model=MODEL, messages=cover_question(), max_tokens=6,
            response_format=response_format(name, UNSUPPORTED[name]),
        )
    assert refused.value.body["param"] == "response_format"


def test_the_task_api_takes_options_response_format(api: httpx.Client) -> None:
    body = {
        "task": "ask",
        "prompt": "Title and author?",
        "images": [{"data": data_uri()}],
        "options": {"response_format": response_format("book", BOOK), "max_new_tokens": 120},
    }
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    result = wait_for_result(api, response.json()["id"])
    assert result["finish_reason"] == "stop", result
    jsonschema.validate(json.loads(result["text"]), BOOK)
    body["options"] = {"response_format": response_format("bad", UNSUPPORTED["if_then_else"])}
    refused = api.post("/v1/tasks", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "response_format"


def test_the_responses_apis_parse_returns_the_pydantic_model(sdk: openai.OpenAI) -> None:
    response = sdk.responses.parse(
        model=MODEL,
        input=[{"role": "user", "content": [
            {"type": "input_text", "text": "The book's title and author?"},
            {"type": "input_image", "image_url": data_uri()},
        ]}],
        text_format=BookCover,
        max_output_tokens=120,
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, BookCover)
