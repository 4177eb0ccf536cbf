"""The native API's schemas are the contract's: same fields, same types, same results."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from pydantic import ValidationError

from producer.gateway.wire import (
    ImageInput,
    TaskResultBody,
    TaskSubmission,
    submission_images,
)
from vision_queue.documents import DOCUMENT_RESULT_FIELDS
from vision_queue.errors import ImageFetchFailed, ImageTooLarge, InvalidInput
from vision_queue.protocol import Priority
from vision_queue.results import TaskResult, Timings
from vision_queue.schemas import ImageRef, ImageSource, TaskOptions


def finished(**changes) -> dict:
    result = TaskResult(
        id="5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10",
        task="ocr",
        text="HELLO",
        model="tiny",
        prompt_tokens=40,
        completion_tokens=3,
        timings=Timings(queued=0.01, fetch=0.02, preprocess=0.03, generate=0.04, total=0.1),
        worker="w1",
        device="cpu",
        finish_reason="stop",
        **changes,
    )
    return result.to_dict()


LOGPROB = {
    "token": " a",
    "logprob": -0.5,
    "bytes": [32, 97],
    "top_logprobs": [{"token": " a", "logprob": -0.5, "bytes": [32, 97]}],
}


CHOICE = {"index": 0, "text": "a", "finish_reason": "stop", "completion_tokens": 1}


@pytest.mark.parametrize(
    ("result", "state"),
    [
        (finished(), "SUCCESS"),
        (finished(error={"code": "cancelled", "message": "by the client"}), "FAILURE"),
        (finished(error={"code": "invalid_input", "message": "x", "field": "prompt"}), "FAILURE"),
        (finished(logprobs=[LOGPROB]), "SUCCESS"),
        (finished(choices=[CHOICE, {**CHOICE, "index": 1}]), "SUCCESS"),
    ],
)
def test_the_result_schema_carries_every_field_of_the_contracts_result(result, state):
    # What a worker stores, plus the state the client adds, reads back unchanged.
    stored = {**result, "state": state}
    assert TaskResultBody.of(stored).to_json() == stored


def test_the_result_schema_has_no_field_the_contract_lacks():
    keys = set(
        finished(
            error={"code": "cancelled", "message": ""}, logprobs=[LOGPROB], choices=[CHOICE]
        )
    )
    # A document's result (vision_queue/documents.py) adds its pages.
    assert set(TaskResultBody.model_fields) == keys | {"state", *DOCUMENT_RESULT_FIELDS}


def test_a_documents_result_reads_back_unchanged():
    page = {"page": 1, "id": "p", "state": "SUCCESS", "text": "t", "usage": {}, "worker": "w"}
    pages = {"pages": [page], "pages_total": 1, "pages_done": 1, "pages_failed": 0}
    stored = {**finished(), **pages, "state": "SUCCESS"}
    assert TaskResultBody.of(stored).to_json() == stored


def test_a_failure_before_any_worker_ran_still_fits_the_schema():
    # The client's result for a task cancelled while queued: no text, usage or timings.
    early = {"id": "x", "task": "ask", "state": "FAILURE",
             "error": {"code": "cancelled", "message": "cancelled before it started"}}
    body = TaskResultBody.of(early).to_json()
    assert body["error"]["code"] == "cancelled"
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}


def test_the_submission_takes_the_contracts_options_as_they_are():
    schema = TaskSubmission.model_json_schema()
    options = schema["$defs"]["TaskOptions"]["properties"]
    assert set(options) == {f.name for f in dataclasses.fields(TaskOptions)}
    submission = TaskSubmission.model_validate_json(
        '{"task": "ask", "prompt": "hi", "options": {"temperature": 0.5, "stop": ["X"]}}'
    )
    assert submission.options == TaskOptions(temperature=0.5, stop=("X",))


@pytest.mark.parametrize(
    "raw",
    [
        '{"task": "paint"}',
        '{"task": "ask", "options": {"temperature": "hot"}}',
        '{"task": "ask", "options": {"beam_width": 4}}',
        '{"task": "ask", "messages": [{"role": "wizard", "text": "x"}]}',
        '{"task": "ask", "images": [{"path": "/etc/passwd"}]}',
        '{"task": "ask", "prompt": 5}',
        '{"task": "ask", "urgency": "high"}',
        '{"task": "ask", "priority": "urgent"}',
        '{"task": "ask", "priority": 1}',
    ],
)
def test_wrong_shapes_and_types_are_refused(raw):
    with pytest.raises(ValidationError):
        TaskSubmission.model_validate_json(raw)


def test_the_submission_takes_a_priority_normal_by_default():
    assert TaskSubmission.model_validate_json('{"task": "ask"}').priority is Priority.NORMAL
    for value in Priority:
        raw = f'{{"task": "ask", "priority": "{value.value}"}}'
        assert TaskSubmission.model_validate_json(raw).priority is value
    schema = TaskSubmission.model_json_schema()
    assert schema["$defs"]["Priority"]["enum"] == ["high", "normal", "low"]


def test_images_are_urls_or_base64_never_paths():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8).decode()
    images = submission_images(
        [ImageInput(url="https://img.example/a.png"), ImageInput(data=png),
         ImageInput(data="data:image/png;base64," + png)],
        max_bytes=1000,
        allowlist=frozenset(),
    )
    # A URL is handed on as an explicit URL reference, data is decoded here: the client
    # never gets a string it could take for a path.
    assert images[0] == ImageRef(ImageSource.URL, "https://img.example/a.png")
    assert images[1] == images[2] == base64.b64decode(png)

    for bad, code in [
        (ImageInput(url="/etc/passwd"), InvalidInput),
        (ImageInput(url="file:///etc/passwd"), InvalidInput),
        (ImageInput(url="DATA:/etc/passwd"), InvalidInput),
        (ImageInput(data="DATA:/etc/passwd"), InvalidInput),
        (ImageInput(data="Data:image/png;base64,%%%"), InvalidInput),
        (ImageInput(url="http://169.254.169.254/latest"), ImageFetchFailed),
        (ImageInput(), InvalidInput),
        (ImageInput(url="https://a.example/x", data=png), InvalidInput),
        (ImageInput(data="%%%"), InvalidInput),
        (ImageInput(data=base64.b64encode(b"x" * 2000).decode()), ImageTooLarge),
    ]:
        with pytest.raises(code) as caught:
            submission_images(
                [ImageInput(url="https://a.example/ok"), bad], 1000, frozenset()
            )
        assert caught.value.field == "images[1]"
