"""response_format in the task message: its forms, the byte cap, and what the door refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from support.schemas import SCHEMAS, UNSUPPORTED, response_format

from vision_queue.errors import InvalidInput
from vision_queue.schemas import TaskOptions, _parse_options, check_generation_options
from vision_queue.structured import MAX_SCHEMA_BYTES, parse_response_format


def options(raw_format: Any) -> TaskOptions:
    parsed = _parse_options({"response_format": raw_format})
    check_generation_options(parsed)
    return parsed


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_supported_schema_round_trips_the_wire(name: str) -> None:
    parsed = options(response_format(name, SCHEMAS[name]))
    assert _parse_options(parsed.to_dict()) == parsed


def test_json_object_and_text() -> None:
    assert options({"type": "json_object"}).response_format == {"type": "json_object"}
    assert options({"type": "text"}).response_format is None
    assert "response_format" not in TaskOptions().to_dict()  # older workers read the rest


@pytest.mark.parametrize(
    "bad",
    [
        "json",
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": []}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
        {"type": "json_object", "json_schema": {}},
        *(response_format(name, schema) for name, schema in UNSUPPORTED.items()),
        response_format("big", {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}),
    ],
)
def test_what_is_refused_names_response_format(bad: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        options(bad)
    assert caught.value.field == "response_format"


def test_a_pydantic_model_class_becomes_its_strict_schema() -> None:
    class Book(BaseModel):
        title: str
        author: str

    parsed = parse_response_format(Book)
    assert parsed is not None
    assert parsed["json_schema"]["name"] == "Book"
    assert parsed["json_schema"]["strict"] is True
    assert set(parsed["json_schema"]["schema"]["properties"]) == {"title", "author"}
