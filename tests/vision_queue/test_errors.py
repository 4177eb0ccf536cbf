"""Errors: stable codes, and retry decided by the error class alone."""

from __future__ import annotations

import pytest

from vision_queue.errors import (
    MAX_MESSAGE_CHARS,
    Cancelled,
    DocumentFailed,
    ErrorCode,
    ImageFetchFailed,
    ImageTooLarge,
    InvalidDocument,
    InvalidInput,
    ModelError,
    ResourceExhausted,
    TaskFailed,
    TaskTimeout,
    UnsupportedImage,
    error_from_dict,
)

ALL = [
    InvalidInput,
    ImageFetchFailed,
    ImageTooLarge,
    UnsupportedImage,
    ModelError,
    ResourceExhausted,
    TaskTimeout,
    Cancelled,
    InvalidDocument,
    DocumentFailed,
]


def test_the_codes_are_the_documented_ones():
    assert {cls.code.value for cls in ALL} == {
        "invalid_input",
        "image_fetch_failed",
        "image_too_large",
        "unsupported_image",
        "model_error",
        "resource_exhausted",
        "timeout",
        "cancelled",
        "invalid_document",
        "document_failed",
    }
    assert {code.value for code in ErrorCode} == {cls.code.value for cls in ALL}


@pytest.mark.parametrize("cls", ALL)
def test_only_transient_fetch_failures_are_retried(cls):
    assert cls("x").transient is False
    assert ImageFetchFailed("502 from origin", transient=True).transient is True


@pytest.mark.parametrize("cls", ALL)
def test_errors_round_trip_through_their_wire_form(cls):
    error = cls("something went wrong", field="images[0]")
    again = error_from_dict(error.to_dict())
    assert type(again) is cls
    assert again.to_dict() == error.to_dict()


def test_a_failed_task_carries_the_whole_result():
    result = {"id": "x", "task": "ocr", "error": {"code": "timeout", "message": "too slow"}}
    failed = TaskFailed(result)
    assert failed.args == (result,)  # what Celery serialises as JSON
    assert isinstance(failed.error, TaskTimeout)
    assert str(failed) == "timeout: too slow"


def test_a_message_never_carries_more_than_a_short_prefix():
    # Whatever a raiser quotes (a path that was really base64, a library's own message)
    error = InvalidInput("cannot read " + "A" * 50_000, field="images[0]")
    assert len(error.message) == MAX_MESSAGE_CHARS and error.message.endswith("…")
    assert len(str(error)) < MAX_MESSAGE_CHARS + 20
    assert error_from_dict(error.to_dict()).message == error.message
