"""Request validation: the same rules before queuing and again on the worker."""

from __future__ import annotations

import json

import pytest

from producer.errors import InvalidInput
from producer.schemas import ImageRef, ImageSource, TaskOptions, TaskRequest, parse_request
from producer.settings import Settings

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
