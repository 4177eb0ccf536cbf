"""/openapi.json describes both APIs from the contract, and the running gateway keeps to it
(schemathesis generates requests from the schema against a real gateway and worker)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gateway_support import API_KEY, MODEL, GatewayProcess, wait_for_result

from producer.gateway.app import create_app
from vision_queue.schemas import ChatMessage, TaskOptions
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(600)

SETTINGS = Settings.from_env({}, api_keys=API_KEY, gateway_model_name=MODEL)
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_the_schema_describes_both_apis_with_the_contracts_types():
    schema = create_app(SETTINGS).openapi()
    paths = schema["paths"]

    assert set(paths) >= {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/events",
        "/healthz",
        "/readyz",
        "/readyz/redis",
    }
    components = schema["components"]["schemas"]
    # The request takes the contract's own options and conversation turns,
    assert set(components["TaskOptions"]["properties"]) == {
        f.name for f in dataclasses.fields(TaskOptions)
    }
    assert set(components["ChatMessage"]["properties"]) == {
        f.name for f in dataclasses.fields(ChatMessage)
    }
    body = paths["/v1/tasks"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    # every error is documented in one shape, and validation failures are 400, never 422.
    for operations in paths.values():
        for operation in operations.values():
            assert "422" not in operation["responses"]
    assert paths["/v1/tasks"]["post"]["responses"]["429"]["content"]["application/json"] == {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}
    }


def test_generated_requests_meet_no_server_error_and_no_answer_outside_the_schema(
    gateway: GatewayProcess, api: httpx.Client, tmp_path: Path
):
    # A finished task gives the task routes a real id to work on.
    accepted = api.post("/v1/tasks", json={"task": "ask", "prompt": "Hi.",
                                           "options": {"max_new_tokens": 2}})
    task_id = accepted.json()["id"]
    assert wait_for_result(api, task_id)["state"] == "SUCCESS"
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\ntask_id = "{task_id}"\nmodel_id = "{MODEL}"\n')

    run = subprocess.run(
        [
            sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
            "--config-file", str(config), "run",
            gateway.url("/openapi.json"),
            "--header", f"Authorization: Bearer {API_KEY}",
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "15",
            "--seed", "7",
            "--generation-database", "none",
            "--workers", "1",
            "--request-timeout", "120",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    (tmp_path / "schemathesis.out").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
