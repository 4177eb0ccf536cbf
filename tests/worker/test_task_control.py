"""A task's run control: what stops a generation, in which order, and what it records."""

from __future__ import annotations

import time
from typing import Any

import pytest

from vision_queue.errors import Cancelled, TaskTimeout
from vision_queue.results import TaskResult
from worker.handler import LeaseLost, TaskControl


def control(**overrides: Any) -> tuple[TaskControl, list[int], list[str]]:
    progress: list[int] = []
    streamed: list[str] = []
    fields: dict[str, Any] = {
        "deadline": time.time() + 60,
        "time_limit_s": 60,
        "report_progress": progress.append,
        "stream_text": streamed.append,
    }
    fields.update(overrides)
    return TaskControl("t1", **fields), progress, streamed


def test_a_lost_lease_stops_first_then_a_cancel_then_the_deadline() -> None:
    lost, _, _ = control(still_ours=lambda: False, is_cancelled=lambda: True, deadline=0.0)
    cancelled, _, _ = control(is_cancelled=lambda: True, deadline=0.0)
    late, _, _ = control(deadline=0.0, time_limit_s=6)

    with pytest.raises(LeaseLost, match="t1"):
        lost.check()
    with pytest.raises(Cancelled):
        cancelled.check()
    with pytest.raises(TaskTimeout, match="VQ_TASK_TIME_LIMIT_S=6s"):
        late.check()
    control()[0].check()  # ours, not cancelled, in time: nothing raised


def test_a_token_is_counted_even_when_it_stops_the_task_but_reported_only_when_not() -> None:
    cancel = {"now": False}
    run, progress, _ = control(is_cancelled=lambda: cancel["now"])
    run.on_token(1)
    cancel["now"] = True

    with pytest.raises(Cancelled):
        run.on_token(2)

    assert run.so_far.completion_tokens == 2
    assert progress == [1]


def test_text_and_usage_so_far_fill_a_stopped_tasks_result() -> None:
    run, _, streamed = control()
    run.on_prompt(15)
    run.on_text("Hello, ")
    run.on_text("world")
    run.on_token(2)
    result = TaskResult(id="t1", task="ask")

    run.so_far.fill(result, "cancelled")

    assert streamed == ["Hello, ", "world"]
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Hello, world", 15, 2)
    assert result.finish_reason == "cancelled"
