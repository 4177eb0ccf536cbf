"""The Responses API through the official `openai` SDK, unchanged: `client.responses.create`.

Real parts: `producer serve`, redis-server, a worker on the tiny checkpoint. Decoding is
greedy, so a response's text is the chat completion's text for the same conversation.
"""

from __future__ import annotations

import openai
import pytest
from gateway_support import MODEL, data_uri

pytestmark = pytest.mark.timeout(300)


def test_a_response_has_the_chat_completions_text_and_usage(sdk: openai.OpenAI):
    response = sdk.responses.create(
        model=MODEL, input="Name three colours.", instructions="Be brief.", max_output_tokens=8
    )
    chat = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours."},
        ],
        max_tokens=8,
    )
    assert response.object == "response"
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    assert response.store is False
    # The token limit ended it: incomplete, as OpenAI reports max_output_tokens.
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"


def test_input_messages_carry_text_and_image_parts(sdk: openai.OpenAI):
    image = data_uri()
    response = sdk.responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": image},
                ],
            }
        ],
        max_output_tokens=6,
        temperature=0,
    )
    chat = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        max_tokens=6,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_a_streamed_response_sends_the_sdks_event_sequence(sdk: openai.OpenAI):
    events = list(
        sdk.responses.create(model=MODEL, input="Count to five.", max_output_tokens=8, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        kinds[-1],
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text
    assert final.usage.output_tokens > 0
    plain = sdk.responses.create(model=MODEL, input="Count to five.", max_output_tokens=8)
    assert plain.output_text == final.output_text


def test_the_sdks_stream_helper_reads_the_events(sdk: openai.OpenAI):
    # The random-weight checkpoint never stops by itself: the token limit ends the
    # response, so the last event is `response.incomplete` (as OpenAI sends it).
    with sdk.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=6) as stream:
        events = list(stream)
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == streamed


def test_stored_state_and_unsupported_schemas_are_refused_clearly(sdk: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model=MODEL, input="Go on.", previous_response_id="resp_123")
    assert refused.value.body["param"] == "previous_response_id"
    assert "store" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as structured:
        sdk.responses.create(
            model=MODEL,
            input="A JSON object, please.",
            text={"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}},
        )
    assert structured.value.body["param"] == "text.format"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="gpt-4o", input="Hello.")
