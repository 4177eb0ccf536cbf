"""Structured output: `response_format` in OpenAI's shape, checked the same on both sides.

Two forms, as OpenAI takes them:

* `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}`
* `{"type": "json_object"}`: any JSON object.

`check_response_format` is run by the producer before queueing and by the worker at its
door (`check_request`): the form, a byte cap on the schema (`MAX_SCHEMA_BYTES`), and the
schema compiled by the constraint engine (llguidance) where it is installed, so a schema
it cannot compile, or that uses a keyword outside the supported subset (docs/model.md),
is `invalid_input` naming `response_format` and nothing is queued. `grammar_for` turns a
checked format into the grammar the worker's decoder is constrained by: compact JSON
(no whitespace between tokens), so a model cannot wander.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from vision_queue.errors import InvalidInput
from vision_queue.schema_finite import require_finite

FIELD = "response_format"
MAX_SCHEMA_BYTES = 16 * 1024  # the schema's compact JSON
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Compact JSON: no whitespace between tokens; keywords outside the subset are refused.
COMPILE_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "lenient": False}
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """A caller's response_format as the canonical dict the task message carries.

    A pydantic model class is taken too (its JSON schema, named after the class, strict)."""
    if value is None:
        return None
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        value = {
            "type": "json_schema",
            "json_schema": {
                "name": value.__name__[:64],
                "schema": value.model_json_schema(),
                "strict": True,
            },
        }
    if not isinstance(value, dict):
        raise InvalidInput("response_format must be an object", field=FIELD)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        if set(value) - {"type"}:
            raise InvalidInput("a json_object response_format takes only type", field=FIELD)
        return {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidInput(
            "response_format.type must be json_schema, json_object or text", field=FIELD
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or set(value) - {"type", "json_schema"}:
        raise InvalidInput(
            "a json_schema response_format needs a json_schema object", field=FIELD
        )
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise InvalidInput(
            f"response_format.json_schema takes no {unknown[0][:40]!r}", field=FIELD
        )
    name = spec.get("name", "response")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            "response_format.json_schema.name must be 1 to 64 letters, digits, _ or -",
            field=FIELD,
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidInput("response_format.json_schema.schema must be an object", field=FIELD)
    strict = spec.get("strict", False)
    if strict is not None and not isinstance(strict, bool):
        raise InvalidInput("response_format.json_schema.strict must be a boolean", field=FIELD)
    canonical = {"name": name, "schema": schema, "strict": bool(strict)}
    return {"type": "json_schema", "json_schema": canonical}


def schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    if response_format.get("type") == "json_object":
        return JSON_OBJECT_SCHEMA
    schema = response_format["json_schema"]["schema"]
    assert isinstance(schema, dict)
    return schema


def check_response_format(response_format: Any) -> None:
    """The rules for a canonical response_format; each fault names `response_format`."""
    if response_format is None:
        return
    canonical = parse_response_format(response_format)
    if canonical != response_format:
        raise InvalidInput("response_format is not in its canonical form", field=FIELD)
    grammar = grammar_for(response_format)
    try:
        from llguidance import LLMatcher
    except ImportError:  # a producer without the engine: the worker's door compiles it
        return
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidInput(f"response_format schema is not supported: {error[:300]}", field=FIELD)


def grammar_for(response_format: dict[str, Any]) -> str:
    """The llguidance grammar (its JSON form) of a canonical response_format."""
    schema = schema_of(response_format)
    try:
        text = orjson.dumps(schema)
    except (TypeError, orjson.JSONEncodeError):
        raise InvalidInput("response_format schema must be plain JSON", field=FIELD) from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise InvalidInput(
            f"response_format schema is {len(text)} bytes as JSON, more than {MAX_SCHEMA_BYTES}",
            field=FIELD,
        )
    require_finite(schema, FIELD)
    # The grammar is plain JSON: {"grammars": [{"json_schema": ..., ...}]}, as llguidance's
    # grammar_from_json_schema writes it; built here so the producer needs no llguidance.
    return orjson.dumps(
        {
            "grammars": [
                {
                    "name": "json_schema",
                    "json_schema": {**orjson.loads(text), "x-guidance": COMPILE_OPTIONS},
                }
            ]
        }
    ).decode()
