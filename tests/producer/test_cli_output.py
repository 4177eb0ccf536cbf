"""What `producer` shows a person: task rules, states in words, never PROGRESS."""

from __future__ import annotations

import pytest

from producer.cli_output import WaitReporter, describe_status, status_json, tasks_help
from vision_queue.results import TaskStatus, status_of, task_failed_json
from vision_queue.settings import Settings

TASK_ID = "5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"


def test_the_task_rules_follow_the_contract_and_this_clients_caps():
    settings = Settings.from_env({"VQ_MAX_NEW_TOKENS_CAPS": "ocr=99", "VQ_MAX_IMAGES": "3"})
    rules = tasks_help(settings)
    assert "describe  1 image; fixed prompt, no --prompt; up to 512 tokens" in rules
    assert "ocr       1 image; fixed prompt, no --prompt; up to 99 tokens" in rules
    assert "compare   2-3 images" in rules  # VQ_MAX_IMAGES lowers the contract's 8
    assert "ask       0-3 images; needs --prompt; up to 1024 tokens" in rules


def test_a_generating_task_is_shown_as_started_never_as_progress():
    status = status_of(TASK_ID, {"status": "PROGRESS", "result": {"tokens": 7}, "worker": "w1"})
    assert status.tokens == 7
    assert status_json(status) == {"id": TASK_ID, "state": "STARTED", "tokens": 7, "worker": "w1"}
    assert describe_status(status) == f"{TASK_ID}: running on w1, 7 tokens so far"


def test_a_finished_task_shows_the_tokens_of_its_result():
    meta = {"status": "SUCCESS", "result": {"text": "hi", "usage": {"completion_tokens": 12}}}
    status = status_of(TASK_ID, meta)
    assert status.tokens == 12
    assert status_json(status)["tokens"] == 12
    assert describe_status(status) == f"{TASK_ID}: succeeded, 12 tokens"


def test_a_task_that_failed_before_generating_shows_no_token_count():
    error = {"code": "cancelled", "message": "cancelled before it started"}
    failure = {"id": TASK_ID, "error": error}
    status = status_of(TASK_ID, {"status": "FAILURE", "result": task_failed_json(failure)})
    assert "tokens" not in status_json(status)
    assert describe_status(status, {**failure, "state": "FAILURE"}) == (
        f"{TASK_ID}: failed: cancelled: cancelled before it started"
    )


@pytest.mark.parametrize("workers", [[], ["gpu0@host"]], ids=["none", "one"])
def test_a_wait_warns_once_when_no_worker_consumes_the_queue(capsys, workers: list[str]):
    asked: list[str] = []

    def live() -> list[str]:
        asked.append("gpu")
        return workers

    reporter = WaitReporter(live, "gpu", show_progress=False)
    for _ in range(3):
        reporter(TaskStatus(TASK_ID, "PENDING"))
    reporter(TaskStatus(TASK_ID, "PROGRESS", 3))
    said = capsys.readouterr().err
    assert said.count("no worker is consuming queue gpu") == (0 if workers else 1)
    assert len(asked) == 1  # looked once; again only after WORKER_RECHECK_S while queued
