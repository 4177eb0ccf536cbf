"""Constrained decoding on the tiny random-weight checkpoint (float32, CPU).

Validity is the grammar's job, not the model's: every output that ends by `stop` parses
and validates against its schema, whatever the random weights prefer. Constrained and
free rows share decode steps, and each free row keeps its batch-1 tokens.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import jsonschema
import pytest
from PIL import Image
from support.reference import TINY_MODEL
from support.schemas import SCHEMAS, UNSUPPORTED, response_format

from vision_queue.errors import InvalidInput
from vision_queue.structured import parse_response_format
from worker.inference.engine import Engine, EngineConfig, GenerationRequest, GenerationResult

IMAGE = Image.new("RGB", (336, 336), (120, 60, 30))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineConfig(model=TINY_MODEL, device="cpu", max_batch=4))


def request(prompt: str, budget: int, schema: dict[str, Any] | None = None) -> GenerationRequest:
    fmt = None if schema is None else parse_response_format(response_format("s", schema))
    return GenerationRequest(prompt, [IMAGE], budget, num_crops=1, response_format=fmt)


def serve_together(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    results: list[Any] = [None] * len(requests)

    def serve(index: int) -> None:
        results[index] = engine.generate(requests[index])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_that_ends_by_stop_validates(engine: Engine, name: str) -> None:
    schema = SCHEMAS[name]
    result = engine.generate(request(f"The cover as JSON ({name}).", 160, schema))
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)
    # Compact: no whitespace between tokens (a raw newline cannot be inside a JSON string).
    assert not result.text[:1].isspace() and "\n" not in result.text


def test_json_object_gives_an_object(engine: Engine) -> None:
    fmt = parse_response_format({"type": "json_object"})
    result = engine.generate(
        GenerationRequest("JSON please.", [IMAGE], 200, num_crops=1, response_format=fmt)
    )
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text), dict)
    else:
        assert result.text.startswith("{")


def test_a_budget_that_ends_the_json_early_is_length(engine: Engine) -> None:
    result = engine.generate(request("JSON.", 4, SCHEMAS["nested_objects"]))
    assert result.finish_reason == "length"
    assert result.text.startswith("{")


def test_constrained_and_free_rows_share_steps_and_free_rows_keep_their_text(
    engine: Engine,
) -> None:
    free = [request("Describe the cover.", 24), request("What is the title?", 24)]
    alone = [engine.generate(r).text for r in free]
    constrained = [
        request("Title and author.", 60, SCHEMAS["book"]),
        request("Numbers.", 60, SCHEMAS["numbers_with_bounds"]),
    ]
    steps = engine.scheduler.steps
    results = serve_together(engine, [free[0], constrained[0], free[1], constrained[1]])
    assert [results[0].text, results[2].text] == alone
    for result, name in ((results[1], "book"), (results[3], "numbers_with_bounds")):
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), SCHEMAS[name])
    # Shared steps: fewer than the rows' tokens one after another.
    total = sum(r.completion_tokens for r in results)
    assert engine.scheduler.steps - steps < total


def test_each_schema_is_compiled_once_per_worker(engine: Engine) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    before = engine.grammars.compiles
    for _ in range(3):
        engine.generate(request("n?", 12, schema))
    assert engine.grammars.compiles == before + 1


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_schema_outside_the_subset_is_invalid_input(engine: Engine, name: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        engine.grammars.constraint(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": UNSUPPORTED[name]}}
        )
    assert caught.value.field == "response_format"
