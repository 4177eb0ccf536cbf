"""A schema no finite JSON value satisfies is refused before a row is constrained by it."""

from __future__ import annotations

from typing import Any

import pytest

from vision_queue.errors import InvalidInput
from vision_queue.schema_finite import require_finite


def node(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


LINK = {"$ref": "#/$defs/n"}

FINITE: dict[str, dict[str, Any]] = {
    "optional_next": {"$defs": {"n": node({"v": {"type": "integer"}, "next": LINK}, ["v"])},
                      **LINK},
    "nullable_next": {"$defs": {"n": node({"next": {"anyOf": [LINK, {"type": "null"}]}},
                                          ["next"])}, **LINK},
    "object_or_null": {"$defs": {"n": {**node({"next": LINK}, ["next"]),
                                       "type": ["object", "null"]}}, **LINK},
    "tree_of_arrays": {"$defs": {"n": {"type": "array", "items": LINK}}, **LINK},
    "unused_cycle": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "type": "object"},
    "pointer_into_properties": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"$ref": "#/properties/a"}},
        "required": ["a", "b"],
    },
}

ENDLESS: dict[str, dict[str, Any]] = {
    "required_next": {"$defs": {"n": node({"next": LINK}, ["next"])}, **LINK},
    "root_is_itself": {"$ref": "#"},
    "definition_is_itself": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "array_holding_one_of_itself": {"$defs": {"n": {"type": "array", "minItems": 1,
                                                    "items": LINK}}, **LINK},
    "mutual_cycle_behind_an_optional_property": {
        "$defs": {
            "a": node({"b": {"$ref": "#/$defs/b"}}, ["b"]),
            "b": node({"a": {"$ref": "#/$defs/a"}}, ["a"]),
        },
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/a"}},
    },
    "all_of_a_cycle": {"$defs": {"n": {"allOf": [LINK]}}, **LINK},
}


@pytest.mark.parametrize("name", sorted(FINITE))
def test_a_schema_with_a_way_out_of_its_cycles_is_taken(name: str) -> None:
    require_finite(FINITE[name], "response_format")


@pytest.mark.parametrize("name", sorted(ENDLESS))
def test_a_cycle_every_value_must_follow_is_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        require_finite(ENDLESS[name], "response_format")
    assert caught.value.field == "response_format"
    assert "no finite JSON value" in str(caught.value)
