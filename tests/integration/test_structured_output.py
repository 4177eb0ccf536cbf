"""Structured output through a real worker on the tiny random-weight checkpoint.

Every schema of the table (support/schemas.py) goes in by the Python client and comes
back as text that ends by `stop`, parses, and validates against its schema; the CLI's
`--json-schema FILE` and `--json-object` too; a schema outside the supported subset is
refused before anything is queued.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel, Field
from support.redis_server import RedisServer
from support.schemas import BOOK, SCHEMAS, UNSUPPORTED, response_format
from support.workers import base_env, run_cli

from producer import Client
from vision_queue.errors import InvalidInput
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(300)


class Book(BaseModel):
    title: str = Field(max_length=30)
    author: str = Field(max_length=30)


@pytest.fixture
def structured_client(module_redis: RedisServer, shared_worker) -> Iterator[Client]:
    settings = Settings.from_env(
        {}, redis_url=module_redis.url, connect_timeout_s=3.0, max_new_tokens_caps="ask=64"
    )
    with Client(settings) as client:
        yield client


def test_every_schema_of_the_table_validates_through_a_worker(
    structured_client: Client, images: Path
) -> None:
    image = (images / "poster_500x700.jpg").read_bytes()
    handles = {
        name: structured_client.submit(
            "ask", [image], f"The cover as JSON ({name}).", max_new_tokens=64,
            response_format=response_format(name, schema),
        )
        for name, schema in SCHEMAS.items()
    }
    for name, handle in handles.items():
        result = structured_client.result(handle.id, wait=True, timeout=240)
        assert result["state"] == "SUCCESS", result.get("error")
        assert result["finish_reason"] == "stop", (name, result["text"])
        jsonschema.validate(json.loads(result["text"]), SCHEMAS[name])


def test_a_pydantic_model_class_is_a_response_format(
    structured_client: Client, images: Path
) -> None:
    handle = structured_client.submit(
        "ask", [images / "poster_500x700.jpg"], "Title and author?", response_format=Book
    )
    result = structured_client.result(handle.id, wait=True, timeout=240)
    assert result["finish_reason"] == "stop", result
    book = Book.model_validate_json(result["text"])
    assert len(book.title) <= 30


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_an_unsupported_schema_is_refused_before_queueing(
    structured_client: Client, images: Path, name: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        structured_client.submit(
            "ask", [images / "poster_500x700.jpg"], "JSON?",
            response_format=response_format(name, UNSUPPORTED[name]),
        )
    assert caught.value.field == "response_format"


def test_a_schema_over_the_byte_cap_is_refused(structured_client: Client, images: Path) -> None:
    schema = {"type": "object", "description": "x" * 20000}
    with pytest.raises(InvalidInput, match="bytes") as caught:
        structured_client.submit(
            "ask", [images / "poster_500x700.jpg"], "JSON?",
            response_format=response_format("big", schema),
        )
    assert caught.value.field == "response_format"


def test_the_cli_takes_a_schema_file_and_json_object(
    module_redis: RedisServer, shared_worker, images: Path, tmp_path: Path
) -> None:
    env = base_env(module_redis.url)
    schema_file = tmp_path / "book.json"
    schema_file.write_text(json.dumps(BOOK))
    image = str(images / "poster_500x700.jpg")
    common = ["submit", "--task", "ask", "--image", image, "--prompt", "Title and author?"]
    done = run_cli(
        "producer", [*common, "--json-schema", str(schema_file), "--wait", "--json"], env, 240
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["finish_reason"] == "stop", result
    jsonschema.validate(json.loads(result["text"]), BOOK)
    done = run_cli(
        "producer", [*common, "--json-object", "--max-new-tokens", "6", "--wait", "--json"],
        env, 240,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"].startswith("{")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(UNSUPPORTED["if_then_else"]))
    done = run_cli("producer", [*common, "--json-schema", str(bad)], env, 120)
    assert done.returncode != 0
    assert "response_format" in done.stderr


def test_the_client_asks_for_logprobs_and_reads_them_in_the_result(
    structured_client: Client, images: Path
) -> None:
    # Given one greedy task with logprobs and a grammar, and one without either
    image = (images / "poster_500x700.jpg").read_bytes()
    asked = structured_client.submit(
        "ask", [image], "Title?", max_new_tokens=8, logprobs=True, top_logprobs=4,
        response_format={"type": "json_object"},
    )
    plain = structured_client.submit("ask", [image], "Title?", max_new_tokens=8)
    # Then the first carries one entry per token (4 sorted alternatives each, the model's
    # own distribution: under a grammar the chosen token need not be the first), the
    # second none
    result = structured_client.result(asked.id, wait=True, timeout=240)
    assert result["state"] == "SUCCESS", result.get("error")
    entries = result["logprobs"]
    assert entries and len(entries) <= result["usage"]["completion_tokens"]
    for entry in entries:
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry["logprob"] <= values[0]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode().strip() == result["text"].strip()
    other = structured_client.result(plain.id, wait=True, timeout=240)
    assert "logprobs" not in other
    # And top_logprobs out of range is refused before anything is queued
    with pytest.raises(InvalidInput) as refused:
        structured_client.submit("ask", [image], "Title?", logprobs=True, top_logprobs=21)
    assert refused.value.field == "top_logprobs"
