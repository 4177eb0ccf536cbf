"""Request validation: the same rules before queuing and again on the worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vision_queue.addresses import MAX_URL_CHARS
from vision_queue.errors import InvalidInput
from vision_queue.protocol import PROMPT_CONTROL_TOKENS, TaskName, control_token_in
from vision_queue.schemas import (
    ImageRef,
    ImageSource,
    TaskOptions,
    TaskRequest,
    check_request,
    parse_request,
    redact_message,
)
from vision_queue.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

SETTINGS = Settings.from_env({})
DIGEST = "a" * 64


def message(**changes):
    base = {
        "v": 1,
        "task": "describe",
        "prompt": None,
        "options": {},
        "images": [{"source": "staged", "ref": DIGEST}],
        "submitted_at": 1.0,
    }
    base.update(changes)
    return base


def refused_field(raw) -> str | None:
    with pytest.raises(InvalidInput) as error:
        parse_request(raw, SETTINGS)
    return error.value.field


def test_a_valid_message_round_trips():
    request = parse_request(message(), SETTINGS)
    assert parse_request(request.to_message(), SETTINGS) == request


def test_a_message_stays_small_whatever_the_images():
    request = TaskRequest(
        task=parse_request(
            message(task="compare", images=[{"source": "staged", "ref": DIGEST}] * 8), SETTINGS
        ).task,
        images=tuple(
            ImageRef(ImageSource.URL, "https://example.com/" + "x" * 1000) for _ in range(8)
        ),
    )
    assert len(json.dumps(request.to_message())) < 10_000


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (message(task="paint"), "task"),
        (message(task="compare"), "images"),  # fewer than 2
        (message(task="compare", images=[{"source": "staged", "ref": DIGEST}] * 9), "images"),
        (message(images=[]), "images"),
        (message(task="ask", prompt=None, images=[]), "prompt"),
        (message(task="ask", prompt="x" * 5000, images=[]), "prompt"),
        (message(task="ask", prompt="<|image_1|> hi", images=[]), "prompt"),
        (message(prompt="describe it my way"), "prompt"),
        (message(options={"max_new_tokens": 100_000}), "max_new_tokens"),
        (message(options={"max_new_tokens": "5"}), "max_new_tokens"),
        (message(options={"num_crops": 99}), "num_crops"),
        (message(options={"temperature": 2.5}), "temperature"),
        (message(options={"temperature": -0.1}), "temperature"),
        (message(options={"temperature": "hot"}), "temperature"),
        (message(options={"temperature": True}), "temperature"),
        (message(options={"temperature": float("nan")}), "temperature"),
        (message(options={"top_p": 0}), "top_p"),
        (message(options={"top_p": 1.5}), "top_p"),
        (message(options={"seed": 1.5}), "seed"),
        (message(options={"seed": -1}), "seed"),
        (message(options={"seed": 2**64}), "seed"),
        (message(options={"stop": "END"}), "stop"),
        (message(options={"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (message(options={"stop": [""]}), "stop"),
        (message(options={"stop": ["x" * 65]}), "stop"),
        (message(options={"stop": [7]}), "stop"),
        (message(images=[{"source": "staged", "ref": "not-a-digest"}]), "images[0]"),
        (message(images=[{"source": "ftp", "ref": "x"}]), "images[0]"),
        (message(images="one"), "images"),
        ([1, 2], "request"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(raw, field):
    assert refused_field(raw) == field


def test_max_new_tokens_defaults_to_the_tasks_cap():
    request = TaskRequest(parse_request(message(), SETTINGS).task, (), options=TaskOptions())
    assert request.max_new_tokens(SETTINGS) == SETTINGS.token_caps[request.task]


def test_generation_options_round_trip_through_the_message():
    options = TaskOptions(temperature=0.7, top_p=0.9, seed=42, stop=("END", "\n\n"))
    request = TaskRequest(parse_request(message(), SETTINGS).task, (), options=options)
    raw = json.loads(json.dumps({**message(), "options": request.to_message()["options"]}))
    assert parse_request(raw, SETTINGS).options == options


def test_the_defaults_decode_greedily_without_stop_strings():
    options = parse_request(message(), SETTINGS).options
    assert (options.temperature, options.top_p, options.seed, options.stop) == (0.0, 1.0, None, ())


# Hostile text and numbers: refused on both sides, naming the field, echoing little ----------


def ask(prompt, **options) -> TaskRequest:
    return TaskRequest(TaskName.ASK, (), prompt, TaskOptions(**options))


def refused_by_check(request: TaskRequest) -> InvalidInput:
    with pytest.raises(InvalidInput) as error:
        check_request(request, SETTINGS)
    return error.value


@pytest.mark.parametrize("token", [*PROMPT_CONTROL_TOKENS, "<|image_3|>", "<|im_start|>"])
def test_every_control_token_of_the_tokenizer_is_refused_in_a_prompt(token: str):
    error = refused_by_check(ask(f"Tell me {token} a story"))
    assert error.field == "prompt" and token[:24] in error.message


def test_the_contract_covers_every_added_token_of_the_reference_tokenizer():
    tokenizer = json.loads((ROOT / "tests/data/phi3v-reference/model/tokenizer.json").read_text())
    assert all(control_token_in(t["content"]) for t in tokenizer["added_tokens"])


def test_ordinary_angle_brackets_are_fine():
    check_request(ask("Is 3 < 4 and 5 > 2? Reply in <b>bold</b>, a|b."), SETTINGS)


@pytest.mark.parametrize("prompt", ["broken \ud800 text", "b\udcffad bytes"])
def test_prompts_that_are_not_valid_utf8_are_refused(prompt: str):
    # Lone surrogates: what invalid UTF-8 becomes when read with surrogateescape.
    assert refused_by_check(ask(prompt)).field == "prompt"
    assert refused_field(message(task="ask", prompt=prompt, images=[])) == "prompt"


@pytest.mark.parametrize(
    ("name", "value"), [("max_new_tokens", True), ("max_new_tokens", 8.0), ("num_crops", 2.5)]
)
def test_integer_options_are_refused_unless_integers_on_the_producer_side_too(name, value):
    assert refused_by_check(ask("hi", **{name: value})).field == name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**400])
def test_submitted_at_must_be_finite(value):
    assert refused_field(message(submitted_at=value)) == "submitted_at"
    if isinstance(value, float):
        request = TaskRequest(TaskName.ASK, (), "hi", submitted_at=value)
        assert refused_by_check(request).field == "submitted_at"


def test_a_url_longer_than_the_limit_is_invalid_input_naming_the_image():
    url = "https://example.com/" + "x" * MAX_URL_CHARS
    request = TaskRequest(TaskName.DESCRIBE, (ImageRef(ImageSource.URL, url),))
    assert refused_by_check(request).field == "images[0]"
    assert refused_field(message(images=[{"source": "url", "ref": url}])) == "images[0]"


@pytest.mark.parametrize("task", ["x" * 10_000, {"nested": ["object"]}, object(), 10**100])
def test_error_messages_echo_at_most_a_short_prefix_and_never_a_repr(task):
    with pytest.raises(InvalidInput) as error:
        parse_request(message(task=task), SETTINGS)
    text = error.value.message
    assert len(text) < 200
    assert "0x" not in text and "nested" not in text and "x" * 50 not in text


def test_redacted_messages_lose_url_query_strings_only():
    raw = message(
        task="compare",
        images=[
            {"source": "url", "ref": "https://bucket.example/a.jpg?X-Amz-Signature=SECRET#f"},
            {"source": "staged", "ref": DIGEST},
        ],
    )
    redacted = redact_message(raw)
    assert redacted["images"] == [
        {"source": "url", "ref": "https://bucket.example/a.jpg"},
        {"source": "staged", "ref": DIGEST},
    ]
    assert "SECRET" in json.dumps(raw)  # the original is left alone
