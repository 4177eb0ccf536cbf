"""A failed task travels as Celery's JSON form of `TaskFailed`; readers rebuild the result."""

from __future__ import annotations

from typing import Any

import pytest
from celery.utils.serialization import get_pickleable_exception

from vision_queue.errors import TaskFailed
from vision_queue.results import failure_carried, final_result, task_failed_json

FAILURE = {
    "id": "t-1",
    "task": "ocr",
    "text": "",
    "error": {"code": "image_fetch_failed", "message": "HTTP 404", "field": "images"},
}


def test_celery_keeps_the_exception_a_task_raises_as_it_is() -> None:
    # Celery swaps an exception it cannot pickle for a wrapper, whose JSON form no reader
    # understands: TaskFailed must survive that check unchanged.
    failure = TaskFailed(dict(FAILURE))
    assert get_pickleable_exception(failure) is failure


@pytest.mark.parametrize("module", ["vision_queue.errors", "producer.errors"])
def test_a_stored_failure_is_read_back_whole_from_either_module_name(module: str) -> None:
    # Given a failure stored by this release's workers or by an earlier one (the class
    # then lived in producer.errors), when a client reads it, then it gets the whole result.
    stored: dict[str, Any] = {**task_failed_json(FAILURE), "exc_module": module}
    assert failure_carried(stored) == FAILURE
    result = final_result("t-1", {"status": "FAILURE", "result": stored})
    assert result["state"] == "FAILURE"
    assert result["error"] == FAILURE["error"]


def test_what_workers_write_names_the_class_where_it_lives() -> None:
    assert task_failed_json(FAILURE)["exc_module"] == TaskFailed.__module__


def test_an_exception_of_another_module_is_not_taken_for_ours() -> None:
    stored = {**task_failed_json(FAILURE), "exc_module": "os"}
    assert failure_carried(stored) is None
    assert final_result("t-1", {"status": "FAILURE", "result": stored})["error"]["code"] == (
        "model_error"
    )
