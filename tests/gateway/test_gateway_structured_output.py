"""Structured output and log probabilities through the gateway: the official `openai`
SDK's `parse()` with a pydantic model (chat completions and the Responses API),
`response_format` streamed, the native task API's `options.response_format`, a schema
outside the subset refused with a 400 naming it; `logprobs` read by the SDK, streamed and
not, and the task API's `options.logprobs`.

Real parts: `producer serve`, redis-server, a worker on the tiny random-weight checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import jsonschema
import openai
import pytest
from gateway_support import MODEL, data_uri, read_events, wait_for_result
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


# Log probabilities ---------------------------------------------------------------------


def test_the_sdk_reads_logprobs_of_a_completion(sdk: openai.OpenAI) -> None:
    # Given a greedy completion asking for 3 alternatives per token
    completion = sdk.chat.completions.create(
        model=MODEL, messages=cover_question(), max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = completion.choices[0]
    # Then every generated token has its logprob, bytes and 3 sorted alternatives, the
    # first being the token itself (greedy), and the tokens' bytes spell the text
    assert choice.logprobs is not None and choice.logprobs.content
    for item in choice.logprobs.content:
        assert item.logprob <= 0.0
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == item.logprob
        values = [alt.logprob for alt in item.top_logprobs]
        assert values == sorted(values, reverse=True)
    spelled = b"".join(bytes(item.bytes or []) for item in choice.logprobs.content)
    text = choice.message.content or ""
    assert spelled.decode("utf-8", errors="replace").strip() == text.strip()
    # And without the ask there are none
    plain = sdk.chat.completions.create(model=MODEL, messages=cover_question(), max_tokens=8)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == text


def test_streamed_chunks_carry_the_logprobs_of_their_tokens(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(
        model=MODEL, messages=cover_question(), max_tokens=8, logprobs=True
    )
    stream = sdk.chat.completions.create(
        model=MODEL, messages=cover_question(), max_tokens=8, logprobs=True, stream=True
    )
    entries = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                entries.extend(choice.logprobs.content)
    expected = whole.choices[0].logprobs
    assert expected is not None and expected.content
    assert [(e.token, e.logprob) for e in entries] == [
        (e.token, e.logprob) for e in expected.content
    ]
    assert all(e.top_logprobs == [] for e in entries)


@pytest.mark.parametrize(
    "fields",
    [{"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}],
)
def test_top_logprobs_out_of_range_or_alone_is_a_400(sdk: openai.OpenAI, fields: dict) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model=MODEL, messages=cover_question(), max_tokens=2, **fields
        )
    assert refused.value.body["param"] == "top_logprobs"


def test_the_task_api_takes_options_logprobs(api: httpx.Client) -> None:
    body = {
        "task": "ask",
        "prompt": "Title and author?",
        "images": [{"data": data_uri()}],
        "options": {"logprobs": True, "top_logprobs": 2, "max_new_tokens": 6},
    }
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    result = wait_for_result(api, response.json()["id"])
    assert result["state"] == "SUCCESS", result
    entries = result["logprobs"]
    assert 0 < len(entries) <= result["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)
    body["options"] = {"top_logprobs": 2}
    refused = api.post("/v1/tasks", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "top_logprobs"


# n choices ---------------------------------------------------------------------------------


def test_n_choices_come_from_one_task_with_the_prompt_counted_once(
    sdk: openai.OpenAI, api: httpx.Client
) -> None:
    # Given a sampled completion asking for three choices with a seed
    def ask() -> openai.types.chat.ChatCompletion:
        return sdk.chat.completions.create(
            model=MODEL, messages=cover_question(), max_tokens=6, n=3, temperature=1.0,
            seed=42,
        )

    completion = ask()
    # Then there are three choices, the prompt counted once and every choice's tokens
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert completion.usage is not None
    alone = sdk.chat.completions.create(
        model=MODEL, messages=cover_question(), max_tokens=6, temperature=1.0, seed=42
    )
    assert alone.usage is not None
    assert completion.usage.prompt_tokens == alone.usage.prompt_tokens
    assert completion.choices[0].message.content == alone.choices[0].message.content
    # And the same seed gives the same three texts
    again = ask()
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in completion.choices
    ]


def test_the_task_api_takes_options_n(api: httpx.Client) -> None:
    body = {
        "task": "ask",
        "prompt": "Title and author?",
        "images": [{"data": data_uri()}],
        "options": {"n": 2, "max_new_tokens": 4, "temperature": 0.8, "seed": 5},
    }
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    result = wait_for_result(api, response.json()["id"])
    assert result["state"] == "SUCCESS", result
    choices = result["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert result["text"] == choices[0]["text"]
    assert result["usage"]["completion_tokens"] == sum(c["completion_tokens"] for c in choices)
    body["options"] = {"n": 9}
    refused = api.post("/v1/tasks", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "n"


@dataclass
class Streamed:
    """Each choice's streamed text, finish reasons and logprob entries, by index; usages."""

    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, list[str]] = field(default_factory=dict)
    entries: dict[int, list] = field(default_factory=dict)
    usages: list = field(default_factory=list)


def read_choices(stream: openai.Stream) -> Streamed:
    got = Streamed()
    for chunk in stream:
        if chunk.usage is not None:
            got.usages.append(chunk.usage)
        for choice in chunk.choices:
            got.texts[choice.index] = got.texts.get(choice.index, "") + (
                choice.delta.content or ""
            )
            if choice.finish_reason:
                got.finish.setdefault(choice.index, []).append(choice.finish_reason)
            if choice.logprobs is not None and choice.logprobs.content:
                got.entries.setdefault(choice.index, []).extend(choice.logprobs.content)
    return got


def test_n_choices_stream_side_by_side_as_the_sdk_reads_them(sdk: openai.OpenAI) -> None:
    sampled = {
        "model": MODEL, "messages": cover_question(), "max_tokens": 8, "n": 3,
        "temperature": 1.0, "seed": 7,
    }
    # Given the three choices a seed gives, asked without streaming
    whole = sdk.chat.completions.create(**sampled)
    # When the same request is streamed
    got = read_choices(sdk.chat.completions.create(**sampled, stream=True))
    # Then every choice streams, its chunks joining to that choice's text, and each
    # choice ends once with its finish_reason
    assert got.texts == {c.index: c.message.content for c in whole.choices}
    assert got.finish == {c.index: [c.finish_reason] for c in whole.choices}


def test_streamed_choices_carry_their_own_logprobs_and_one_usage_chunk(
    sdk: openai.OpenAI,
) -> None:
    sampled = {
        "model": MODEL, "messages": cover_question(), "max_tokens": 6, "n": 2,
        "temperature": 1.0, "seed": 11, "logprobs": True, "top_logprobs": 1,
    }
    # Given two choices with their logprobs, asked without streaming
    whole = sdk.chat.completions.create(**sampled)
    # When the same request is streamed with the usage chunk asked for
    got = read_choices(
        sdk.chat.completions.create(
            **sampled, stream=True, stream_options={"include_usage": True}
        )
    )
    # Then each choice's chunks carry that choice's tokens' logprobs, all of them
    for choice in whole.choices:
        assert got.texts[choice.index] == choice.message.content
        assert choice.logprobs is not None and choice.logprobs.content
        streamed = [(e.token, e.logprob) for e in got.entries[choice.index]]
        assert streamed == [(e.token, e.logprob) for e in choice.logprobs.content]
    # And the usage comes once, counting every choice's tokens
    assert len(got.usages) == 1 and whole.usage is not None
    assert got.usages[0].completion_tokens == whole.usage.completion_tokens


def test_the_task_events_name_each_deltas_choice(api: httpx.Client) -> None:
    body = {
        "task": "ask",
        "prompt": "Title and author?",
        "images": [{"data": data_uri()}],
        "options": {"n": 2, "max_new_tokens": 6, "temperature": 1.0, "seed": 3},
    }
    # Given a task with two choices
    response = api.post("/v1/tasks", json=body)
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    # When its events are read
    texts: dict[int, str] = {}
    with api.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
        for event in read_events(stream.iter_lines()):
            if event.name == "delta":
                data = event.json()
                texts[data["choice"]] = texts.get(data["choice"], "") + data["text"]
            if event.name == "end":
                result = event.json()
                break
    # Then each delta names its choice, and each choice's deltas join to its text
    assert result["state"] == "SUCCESS", result
    assert any(texts.values())
    assert {c["index"]: texts.get(c["index"], "") for c in result["choices"]} == {
        c["index"]: c["text"] for c in result["choices"]
    }
