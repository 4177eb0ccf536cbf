"""A table of JSON schemas covering every feature of the supported subset (docs/model.md)."""

from __future__ import annotations

from typing import Any

BOOK = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "author": {"type": "string", "maxLength": 40},
    },
    "required": ["title", "author"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "bounded_strings": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "name": {"type": "string", "minLength": 2, "maxLength": 8},
        },
        "required": ["code", "name"],
        "additionalProperties": False,
    },
    "numbers_with_bounds": {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        },
        "required": ["year", "score"],
        "additionalProperties": False,
    },
    "enum_and_const": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "kind": {"const": "cover"},
        },
        "required": ["colour", "kind"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "book": BOOK,
            "shelf": {
                "type": "object",
                "properties": {"row": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["row"],
                "additionalProperties": False,
            },
        },
        "required": ["book", "shelf"],
        "additionalProperties": False,
    },
    "defs_and_ref": {
        "$defs": {"person": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12}},
            "required": ["name"],
            "additionalProperties": False,
        }},
        "type": "object",
        "properties": {"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}},
        "required": ["author", "editor"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                             {"type": "string", "maxLength": 5}]},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "nullable": {
        "type": "object",
        "properties": {
            "subtitle": {"type": ["string", "null"], "maxLength": 10},
            "pages": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 999},
                                {"type": "null"}]},
            "ok": {"type": "boolean"},
        },
        "required": ["subtitle", "pages", "ok"],
        "additionalProperties": False,
    },
    "book": BOOK,
}

# Outside the subset: each is refused with invalid_input naming response_format.
UNSUPPORTED: dict[str, dict[str, Any]] = {
    "if_then_else": {"type": "object", "if": {"required": ["a"]}, "then": {}},
    "unknown_type": {"type": "object", "properties": {"a": {"type": "strin"}}},
    "dependent_schemas": {"type": "object", "dependentSchemas": {"a": {}}},
    # No finite JSON satisfies these: every value must follow the $ref cycle.
    "required_ref_cycle": {
        "$defs": {"node": {
            "type": "object",
            "properties": {"next": {"$ref": "#/$defs/node"}},
            "required": ["next"],
        }},
        "$ref": "#/$defs/node",
    },
    "ref_to_itself": {"$ref": "#"},
}


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
