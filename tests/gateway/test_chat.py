"""OpenAI chat requests in the contract's terms: turns, images in order, options."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from producer.gateway.chat import ChatCompletionRequest, conversation
from vision_queue.errors import InvalidInput
from vision_queue.schemas import ChatMessage, ImageRef, ImageSource, Role, TaskOptions

PNG = "data:image/png;base64,iVBORw0KGgo="


def request(messages: list[dict[str, Any]], **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(
        __import__("json").dumps({"model": "phi", "messages": messages, **fields})
    )


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def test_a_system_message_and_history_become_turns_with_images_in_order():
    # Given a system message, a first question with one image, the model's answer, and a
    # follow-up showing two more images (text before them, as many clients send it),
    convo = conversation(
        request(
            [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": [image("https://img.example/a.png"), text("What?")]},
                {"role": "assistant", "content": "A cat."},
                {
                    "role": "user",
                    "content": [text("Compare with"), image(PNG), text("and"), image(PNG)],
                },
            ]
        )
    )
    # then each turn keeps its role and its own images, numbered across the conversation.
    assert convo.turns == (
        ChatMessage(Role.SYSTEM, "Answer in French."),
        ChatMessage(Role.USER, "What?", 1),
        ChatMessage(Role.ASSISTANT, "A cat."),
        ChatMessage(Role.USER, "Compare with\nand", 2),
    )
    # (URLs as explicit URL references, data: URIs decoded here: nothing is a path)
    png = base64.b64decode(PNG.split(",", 1)[1])
    assert convo.images == [ImageRef(ImageSource.URL, "https://img.example/a.png"), png, png]
    assert convo.image_params == [
        "messages[1].content[0]",
        "messages[3].content[1]",
        "messages[3].content[3]",
    ]


def test_a_developer_message_is_a_system_turn():
    convo = conversation(request([{"role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"}]))
    assert convo.turns[0] == ChatMessage(Role.SYSTEM, "Be brief.")


def test_sampling_fields_map_to_the_contracts_options():
    convo = conversation(
        request(
            [{"role": "user", "content": "Hi"}],
            max_tokens=99,
            max_completion_tokens=12,
            temperature=0.7,
            top_p=0.9,
            seed=7,
            stop="END",
        )
    )
    assert convo.options == TaskOptions(
        max_new_tokens=12, temperature=0.7, top_p=0.9, seed=7, stop=("END",)
    )


def test_left_out_fields_decode_greedily_with_the_tasks_budget():
    convo = conversation(request([{"role": "user", "content": "Hi"}], max_tokens=5))
    assert convo.options == TaskOptions(max_new_tokens=5)
    assert conversation(request([{"role": "user", "content": "Hi"}])).options == TaskOptions()


@pytest.mark.parametrize(
    ("messages", "fields", "param"),
    [
        ([{"role": "assistant", "content": [image(PNG)]}, {"role": "user", "content": "x"}],
         {}, "messages[0].content[0]"),
        ([{"role": "user", "content": [image("file:///etc/passwd")]}], {},
         "messages[0].content[0]"),
        ([{"role": "user", "content": [image("/etc/passwd")]}], {}, "messages[0].content[0]"),
        # Any spelling of data: is a data URI, never a path; other schemes are refused.
        ([{"role": "user", "content": [image("DATA:/etc/passwd")]}], {}, "messages[0].content[0]"),
        ([{"role": "user", "content": [image("FILE:///etc/passwd")]}], {},
         "messages[0].content[0]"),
        ([{"role": "user", "content": [image(" data:image/png;base64,AA==")]}], {},
         "messages[0].content[0]"),
        ([{"role": "user", "content": "x"}], {"frequency_penalty": 1.5}, "frequency_penalty"),
        ([{"role": "user", "content": "x"}], {"logit_bias": {"1": 5}}, "logit_bias"),
        ([{"role": "user", "content": "x"}], {"best_of": 3}, "best_of"),
        ([{"role": "user", "content": "x", "tool_calls": [{"id": "a"}]}], {},
         "messages[0].tool_calls"),
        ([{"role": "user", "content": "x"}], {"n": 9}, "n"),
        ([{"role": "user", "content": "x"}], {"n": 0}, "n"),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "tools"),
        ([{"role": "user", "content": "x"}], {"top_logprobs": 2}, "top_logprobs"),
        ([{"role": "user", "content": "x"}], {"logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ([{"role": "user", "content": "x"}], {"logprobs": True, "top_logprobs": -1},
         "top_logprobs"),
        ([{"role": "user", "content": "x"}], {"response_format": {"type": "xml"}},
         "response_format"),
        ([{"role": "user", "content": "x"}],
         {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
         "response_format"),
    ],
)
def test_what_the_model_cannot_do_is_refused_naming_the_field(messages, fields, param):
    with pytest.raises(InvalidInput) as caught:
        conversation(request(messages, **fields))
    assert caught.value.field == param


def test_a_client_error_about_an_image_names_the_message_part_it_came_from():
    convo = conversation(
        request([{"role": "user", "content": [text("a"), image(PNG), image(PNG)]}])
    )
    assert convo.param_of("images[1]") == "messages[0].content[2]"
    assert convo.param_of("max_new_tokens") == "max_tokens"
    assert convo.param_of("temperature") == "temperature"


def test_fields_asking_for_nothing_and_bookkeeping_fields_are_accepted():
    convo = conversation(
        request(
            [{"role": "user", "content": "x", "name": "ann", "tool_calls": None}],
            user="u-1",
            metadata={"a": "b"},
            frequency_penalty=0,
            presence_penalty=0.0,
            tools=[],
            parallel_tool_calls=True,
        )
    )
    assert convo.turns == (ChatMessage(Role.USER, "x"),)
